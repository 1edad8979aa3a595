"""``python -m staged`` = ``python -m staged.train``."""
from staged.train import main

if __name__ == "__main__":
    main()
