"""A tqdm progress bar as a job listener (used by the CLI and ``ms.extract``): an extraction's over samples, a
training run's over steps."""
from __future__ import annotations

import sys

from tqdm.auto import tqdm


class TqdmListener:
    """Draws a job's ``progress`` events as a tqdm bar: over samples with tokens/s (an extraction), over steps with
    the loss, L0 and explained variance (a training run); prints retries and failures."""

    def __init__(self, **tqdm_options):
        self.options = {"unit": "sample", "dynamic_ncols": True, **tqdm_options}
        self.bar: tqdm | None = None

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "progress" and event.get("kind") == "training":
            if self.bar is None:
                self.bar = tqdm(total=event["total_steps"], initial=event["step"], desc=event["job_id"],
                                **self.options)
            shown = {"loss": ("loss", ".4g"), "l0": ("l0", ".1f"), "ev": ("explained_variance", ".3f")}
            self.bar.set_postfix({name: format(event[key], digits) for name, (key, digits) in shown.items()
                                  if isinstance(event.get(key), (int, float))}, refresh=False)
            self.bar.update(event["step"] - self.bar.n)
        elif kind == "progress":
            if self.bar is None:  # start at the first report, so a resumed job's rate is not inflated
                self.bar = tqdm(total=event["samples_total"], initial=event["samples_done"], desc=event["job_id"],
                                **self.options)
            self.bar.set_postfix(tok_s=f"{event['tokens_per_s']:.0f}", batch=event["batch_size"], refresh=False)
            self.bar.update(event["samples_done"] - self.bar.n)
        elif kind == "evaluating" and self.bar is not None:
            self.bar.write("trained; evaluating the SAE (explained variance, L0, dead latents"
                           + (", the next-token loss with it spliced in" if event.get("loss") else "") + ")...",
                           file=sys.stderr)  # with the bar: stdout holds the summary alone
        elif kind == "retry" and self.bar is not None:
            self.bar.write(f"out of memory: retrying with batch_size={event['batch_size']}")
        elif kind == "failed" and self.bar is not None:
            self.bar.write(f"failed [{event['error_type']}]: {event['error_message']}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
