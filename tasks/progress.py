"""Progress bars of the training loops (tqdm, one line in a terminal and in Prefect's logs)."""

from __future__ import annotations

from tqdm.auto import tqdm


def epoch_progress(prefix: str):
    """A tqdm bar that restarts at each epoch, and the `on_step(epoch, steps, loss)` hook of `fit` driving it."""
    bar = tqdm(total=0, unit="step", mininterval=5, dynamic_ncols=True)
    bar_epoch = [-1]

    def on_step(epoch: int, steps: int, loss: float) -> None:
        if epoch != bar_epoch[0]:
            bar_epoch[0] = epoch
            bar.reset(total=steps)
            bar.set_description(f"{prefix}epoch {epoch + 1}")
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    return bar, on_step
