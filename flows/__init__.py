"""One Prefect flow per DVC stage, each runnable as `python -m flows.<stage>`."""

import tasks  # noqa: F401  (sets the offline environment before prefect is imported)
