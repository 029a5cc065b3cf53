"""Both models of a tiny CODI: the latent student and the direct model, one after the other or at once.

The two share nothing but their settings and held-out questions, so on two cores the direct model trains
in a second process while this one trains the student: the wall time is the slower model's, not the sum. The child is a spawned interpreter (no state
inherited from the parent) that runs ``train_model`` with the thread count it is given, so a model
trained here equals, bit for bit, the one trained in-process on as many threads. It sends each step's
``Progress`` and then its weights and history back over a queue. It ignores SIGINT (Ctrl-C reaches the
whole process group; the parent decides) and is terminated whenever the parent leaves early.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
from collections.abc import Callable
from typing import Any, Self

import torch
from safetensors.torch import load, save

from ctexp.errors import CtexpError
from ctexp.tinycodi.settings import TinyCodiSettings
from ctexp.tinycodi.train import Progress, Trained, new_model, train_model

POLL_SECONDS = 0.5
GRACE_SECONDS = 5.0


def _child(settings_json: dict[str, Any], held: list[str], threads: int, channel: Any) -> None:
    """Train the direct model and send ("progress", Progress)... then ("done", weights, history, seconds)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    settings = TinyCodiSettings.model_validate(settings_json)
    try:
        trained = train_model(settings, 0, set(held), "direct", lambda step: channel.put(("progress", step)))
    except CtexpError as error:
        channel.put(("error", type(error).__name__, str(error)))
        return
    # As bytes: a tensor sent over a queue is shared through a file descriptor that dies with this process.
    weights = {f"{part}.{key}": value.contiguous() for part, module in (("lm", trained.model.lm),
               ("prj", trained.model.prj)) for key, value in module.state_dict().items()}
    channel.put(("done", save(weights), trained.history, trained.seconds))


class DirectInSubprocess:
    """A context that trains the direct model in a spawned process; ``result`` waits for it.

    Use as ``with DirectInSubprocess(...) as other: ...; direct = other.result(progress)``. Leaving the
    block before ``result`` (an error, Ctrl-C) terminates the child.
    """

    def __init__(self, settings: TinyCodiSettings, held: set[str], threads: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._settings = settings
        self._final: tuple[Any, ...] | None = None  # the child's last message, ("done", ...) or ("error", ...)
        self._channel = context.Queue()
        self._process = context.Process(
            target=_child, args=(settings.model_dump(mode="json"), sorted(held), threads, self._channel),
            name="ctexp-tinycodi-direct", daemon=True,
        )

    def __enter__(self) -> Self:
        self._process.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=GRACE_SECONDS)
            if self._process.is_alive():  # still writing to a full pipe, or otherwise stuck: no more waiting
                self._process.kill()
        self._process.join()
        self._channel.cancel_join_thread()
        self._channel.close()

    def relay(self, progress: Callable[[Progress], None] | None) -> Callable[[Progress], None] | None:
        """A progress callback for the latent model that also passes on the child's waiting messages."""
        if progress is None:
            return None

        def both(step: Progress) -> None:
            progress(step)
            if self._final is None:
                self._final = self._drain(progress, block=False)
            if self._final is not None and self._final[0] == "error":
                self._finished(self._final)  # the direct model failed: stop the latent one too

        return both

    def result(self, progress: Callable[[Progress], None] | None) -> Trained:
        """Wait for the child and return the direct model it trained.

        Raises:
            CtexpError: The child's training failed (its error, e.g. TrainingDiverged), or it died.
        """
        while self._final is None:  # the final message may have arrived while the latent model trained
            self._final = self._drain(progress, block=True)
        return self._finished(self._final)

    def _drain(self, progress: Callable[[Progress], None] | None, block: bool) -> tuple[Any, ...] | None:
        """Pass on progress messages; return the final message ("done" or "error") once it arrives."""
        while True:
            try:
                message = self._channel.get(timeout=POLL_SECONDS) if block else self._channel.get_nowait()
            except queue.Empty:
                if block and not self._process.is_alive() and self._channel.empty():
                    raise CtexpError(f"the direct model's training process died (exit code "
                                     f"{self._process.exitcode}); run ctexp codi train --no-parallel") from None
                if not block:
                    return None
                continue
            if message[0] != "progress":
                return message
            if progress is not None:
                progress(message[1])

    def _finished(self, message: tuple[Any, ...]) -> Trained:
        if message[0] == "error":
            from ctexp import errors

            kind = getattr(errors, message[1], CtexpError)
            raise kind(message[2])
        _, weights, history, seconds = message
        tensors = load(weights)
        model = new_model(self._settings, self._settings.seed)
        for part, module in (("lm", model.lm), ("prj", model.prj)):
            module.load_state_dict({key.removeprefix(f"{part}."): value for key, value in tensors.items()
                                    if key.startswith(f"{part}.")})
        model.lm.eval().requires_grad_(False)
        model.prj.eval().requires_grad_(False)
        return Trained(model, 0, history, seconds)


def train_pair(
    settings: TinyCodiSettings, held: set[str], progress: Callable[[Progress], None] | None = None,
    parallel_threads: int | None = None,
) -> tuple[Trained, Trained]:
    """The T-latent student and the 0-latent direct model, same data, init seed and budget.

    Args:
        parallel_threads: Train the direct model at the same time, in a second process, on this many
            threads; None trains the two one after the other, here.
    """
    if parallel_threads is None:
        latent = train_model(settings, settings.latents, held, "latent", progress)
        return latent, train_model(settings, 0, held, "direct", progress)
    # Build a model once before the child starts, so that the parent's imports (transformers' model
    # stack, over a thousand modules) are done by then: a Ctrl-C that lands inside a C extension's
    # import surfaces as an ImportError instead of KeyboardInterrupt.
    new_model(settings, settings.seed)
    with DirectInSubprocess(settings, held, parallel_threads) as other:
        latent = train_model(settings, settings.latents, held, "latent", other.relay(progress))
        return latent, other.result(progress)
