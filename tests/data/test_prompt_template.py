"""prompt_template: rendered over the prompt into the USER turn (EasyR1's format_prompt), the chat
template's default system message kept; loading, checking and the shipped release template."""
import pytest

from staged.config import from_dict
from staged.data import Sample, make_synthetic_dataset
from staged.data.prompting import apply_template, build_generation_batch, load_template, prompt_text

# training/format_prompts/math.jinja of UCSC-VLAA/VLM-CapCurriculum, verbatim (its example says <thinking>)
RELEASE_MATH = ("{{ content | trim }} You FIRST think about the reasoning process as an internal monologue and then "
                "provide the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The "
                "final answer MUST BE put in \\boxed{}. i.e. <thinking> reasoning here </thinking> "
                "\\boxed{final answer here}")


@pytest.fixture(scope="module")
def proc(embedded):
    return embedded[1]


def test_template_goes_into_the_user_turn_and_the_default_system_message_stays(proc):
    img = make_synthetic_dataset("perception", 1, seed=0)[0].images[0]
    s = Sample("<image>  How many circles?\n", "A", "mcq", images=[img])
    text = prompt_text(proc, s, prompt_template=load_template("math"))
    default = prompt_text(proc, Sample("x", "A", "mcq"))
    system = default[:default.index("<|im_start|>user")]
    assert system.startswith("<|im_start|>system\n") and "You FIRST think" not in system  # the template's own
    assert text.startswith(system)  # the default system message, unchanged
    user = text[len(system):]
    assert user.startswith("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>  How many circles? "
                           "You FIRST think about the reasoning process")  # content | trim, then the instruction
    assert user.endswith("\\boxed{final answer here}<|im_end|>\n<|im_start|>assistant\n")
    assert "i.e. <think> reasoning here </think>" in user  # ours: <think>, as the reward checks it


def test_template_changes_the_tokens_and_none_changes_nothing(proc):
    ss = make_synthetic_dataset("textual", 2, seed=0)
    plain = build_generation_batch(proc, ss)
    assert build_generation_batch(proc, ss, prompt_template=None)["input_ids"].equal(plain["input_ids"])
    templ = build_generation_batch(proc, ss, prompt_template="Q: {{ content }} Answer in \\boxed{}.")
    assert templ["input_ids"].shape[1] > plain["input_ids"].shape[1]


def test_shipped_templates():
    assert load_template("math_release").strip() == RELEASE_MATH
    assert load_template("math").strip() == RELEASE_MATH.replace("<thinking> reasoning here </thinking>",
                                                                 "<think> reasoning here </think>")
    assert apply_template("  <image>What?  ", RELEASE_MATH).startswith("<image>What? You FIRST")


@pytest.mark.parametrize("bad, match", [
    ("no such template", "neither a template"),
    ("{{ question }}", "must use"),
    ("{{ content }} {{ other }}", "must use"),
    ("{{ content ", "syntax error"),
])
def test_bad_templates_are_config_errors(bad, match):
    with pytest.raises(ValueError, match=match) as e:
        from_dict({"stages": [{"name": "s", "prompt_template": bad}]})
    assert str(e.value).startswith("stages[0].prompt_template")


def test_template_from_a_file_and_the_marker_count_guard(tmp_path):
    f = tmp_path / "t.jinja"
    f.write_text("{{ content }}!\n")
    cfg = from_dict({"stages": [{"name": "s", "prompt_template": str(f)}]})
    assert cfg.stages[0].prompt_template == "{{ content }}!\n"
    with pytest.raises(ValueError, match="number of <image> markers"):
        apply_template("<image>hi", "<image>{{ content }}")
