import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network


@pytest.fixture(scope="session")
def embedded_dir(tmp_path_factory):
    from staged.models.embedded import build_embedded_checkpoint

    return build_embedded_checkpoint(tmp_path_factory.mktemp("embedded") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def embedded(embedded_dir):
    import warnings

    from staged.models.loading import load_model_and_processor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "using VLProcessor because AutoProcessor failed" without torchvision
        model, processor = load_model_and_processor(embedded_dir)
    return model, processor
