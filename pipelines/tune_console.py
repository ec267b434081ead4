"""What a Ray Tune sweep shows on the console: one bar over its trials instead of Tune's status tables.

By default (a command's log file open, not verbose: pipelines.console) Tune's own reporter is off
(`RunConfig(verbose=0)`: no "Trial status: ..." tables, no "Trial ... completed after ..." lines); what it still
prints (the experiment's configuration table, a trial's error block) goes to the log file (console.stdout_to_log),
and TrialBar, a Tune Callback in the driver, draws one tqdm bar over the trials: finished / num_samples, the best
metric so far and the errored count. `--verbose` (or no log file: a Python caller) keeps Tune's own output.

    output = TuneOutput(num_samples, metric="best_val_weighted_f1", mode="max")
    tuner = Tuner(..., run_config=RunConfig(..., callbacks=[*mine, *output.callbacks], verbose=output.verbose))
    # or a restored tuner: output.apply(tuner)
    with output:
        results = tuner.fit()
"""
from __future__ import annotations

import contextlib
import math

from ray.tune import Callback
from ray.tune.experiment import Trial

from pipelines import console

TUNE_VERBOSE = 1  # Tune's own output when it is shown: status tables every 30 s, a line per finished trial
FINISHED = (Trial.TERMINATED, Trial.ERROR)  # a trial that will not run again (an interrupted one is PAUSED)


class TrialBar(Callback):
    """One bar on the console: trials finished (completed, stopped early or errored) out of num_samples."""

    def __init__(self, num_samples: int, metric: str | None = None, mode: str = "max"):
        self.num_samples, self.metric, self.mode = num_samples, metric, mode
        self.bar = None  # the tqdm bar, drawn at setup (the driver's Tune loop), closed at the experiment's end
        self.shown = (-1, "")  # (finished, postfix) last drawn

    def __getstate__(self) -> dict:  # Tuner pickles its RunConfig with the callbacks (tuner.pkl): not the bar
        return {**self.__dict__, "bar": None, "shown": (-1, "")}

    def setup(self, total_num_samples: int | None = None, **info) -> None:
        self.bar = console.bar(None, self.num_samples or total_num_samples or 0, "trials")

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self.update(trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        self.update(trials)
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def update(self, trials: list) -> None:
        """Redraw when a trial finished or the best metric moved."""
        if self.bar is None:
            return
        finished = sum(1 for t in trials if t.status in FINISHED)
        postfix = self.postfix(trials)
        if (finished, postfix) == self.shown:
            return
        self.shown = (finished, postfix)
        self.bar.set_postfix_str(postfix, refresh=False)
        self.bar.update(finished - self.bar.n)  # redraws as console.bar allows; a restored sweep starts further on

    def postfix(self, trials: list) -> str:
        """"best <metric>=0.412, 1 errored": the best value any trial reported so far, trials that errored."""
        values = [r[self.metric] for t in trials if (r := t.last_result or {}) and self.metric in r
                  and isinstance(r[self.metric], (int, float)) and not math.isnan(r[self.metric])]
        parts = []
        if values:
            parts.append(f"best {self.metric}={(max if self.mode == 'max' else min)(values):.3f}")
        errored = sum(1 for t in trials if t.status == Trial.ERROR)
        if errored:
            parts.append(f"{errored} errored")
        return ", ".join(parts)


class TuneOutput:
    """The console settings of one sweep: Tune's verbosity and the callbacks to add (a TrialBar when quiet)."""

    def __init__(self, num_samples: int, metric: str | None = None, mode: str = "max"):
        self.quiet = console.quiet()
        self.verbose = 0 if self.quiet else TUNE_VERBOSE  # RunConfig.verbose
        self.callbacks = [TrialBar(num_samples, metric, mode)] if self.quiet else []

    def apply(self, tuner) -> None:
        """A restored Tuner runs with the RunConfig it pickled (tuner.pkl), callbacks and verbosity included:
        this run's settings replace those (its other callbacks stay). Tuner has no public accessor for it; under
        Ray Client (no local tuner) the pickled settings stay."""
        local = getattr(tuner, "_local_tuner", None)  # noqa: SLF001 (Tuner.restore takes no RunConfig)
        if local is None:
            return
        run_config = local.get_run_config()
        run_config.verbose = self.verbose
        run_config.callbacks = [c for c in run_config.callbacks or [] if not isinstance(c, TrialBar)] + self.callbacks

    def __enter__(self) -> TuneOutput:
        self._stdout = contextlib.ExitStack()
        self._stdout.enter_context(console.stdout_to_log())
        return self

    def __exit__(self, *exc) -> None:
        self._stdout.close()
        for callback in self.callbacks:  # fit() raised before the experiment's end
            if callback.bar is not None:
                callback.bar.close()
                callback.bar = None
