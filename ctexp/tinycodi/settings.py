"""What ``ctexp codi train`` trains: the task, the model's size and the recipe, as one validated record.

The defaults are the recipe that made a tiny model's latents carry a 3-step chain here (README, ``ctexp
codi``, has what it measured and what was tried before): ``mod10v`` problems of 3 steps, T = 6 latents (two
per CoT step: one per CoT token, value and space), a LLaMA of hidden size 128 and 4 layers, prj trained to
re-embed the teacher's predictions and started at the embeddings' scale, 400 teacher-only steps and then 3
curriculum stages of 300 steps, in which stage ``s`` replaces the first ``s`` CoT steps by latents.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from ctexp.errors import ConfigError
from ctexp.records import FrozenRecord
from ctexp.tinycodi.task import CHAIN, Task, distinct_questions


class TinyCodiSettings(FrozenRecord):
    """Every setting of a tiny-CODI training run (saved with the checkpoint as ``tinycodi.json``)."""

    task: Task = Field(Task.MOD10V, description="Generated problems: mod10v (mod-10 chains, CoT the values), mod10r (mod-10 chains read right to left, CoT equations) or hops (pointer chasing along a chain of digits).")
    min_steps: int = Field(3, ge=1, description="Fewest CoT steps of a generated problem.")
    max_steps: int = Field(3, ge=1, description="Most CoT steps of a generated problem.")
    latents: int = Field(6, ge=1, description="T: latent steps of the student.")
    hidden: int = Field(128, ge=8, description="Hidden size.")
    layers: int = Field(4, ge=1, description="Transformer blocks.")
    heads: int = Field(4, ge=1, description="Attention heads.")
    intermediate: int = Field(512, ge=8, description="MLP inner size.")
    batch_size: int = Field(64, ge=1, description="Problems per step.")
    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    warmup: int = Field(50, ge=0, description="Linear warmup steps.")
    decay_fraction: float = Field(0.2, ge=0, le=1, description="Fraction of the steps, at the end, over which the rate decays linearly.")
    final_lr_fraction: float = Field(0.05, ge=0, le=1, description="The last learning rate, as a fraction of the peak.")
    teacher_steps: int = Field(400, ge=0, description="Teacher-only steps before the first stage.")
    stage_steps: int = Field(300, ge=1, description="Steps per curriculum stage.")
    stages: int = Field(3, ge=1, description="Curriculum stages; stage s replaces the first s CoT steps.")
    teacher_weight: float = Field(1.0, ge=0, description="Weight of the teacher's CE (explicit CoT).")
    distill_weight: float = Field(0.0, ge=0, description="Weight of the L1 distillation at the answer token.")
    latent_forcing: float = Field(0.0, ge=0, le=1, description=(
        "Latent forcing at the first stage: each fed-back thought is mixed with the embedding of the value its"
        " step computes, with this weight, decaying linearly to 0 by the last stage (0: plain CODI)."))
    thought_isolation: float = Field(0.0, ge=0, le=1, description=(
        "Thought isolation at the first stage: in this fraction of each batch's problems every latent step sees"
        " only the question, bot and itself, and the answer only the last thought, so values must pass through"
        " the fed-back thoughts; decays linearly to 0 by the last stage (0: plain CODI)."))
    reembed_weight: float = Field(1.0, ge=0, description=(
        "Weight of prj's re-embedding loss on the teacher's pass: prj maps the last hidden state at bot and at each"
        " CoT position to the input embedding of the token that follows (0: plain CODI)."))
    prj_gain: float = Field(0.02, gt=0, description=(
        "prj's LayerNorm gain at init (1: nn.LayerNorm's; 0.02 puts the thoughts at the scale of the token"
        " embeddings, whose init std is 0.02)."))
    validation: int = Field(100, ge=1, description="Held-out validation problems per length.")
    test: int = Field(500, ge=1, description="Held-out test problems per length.")
    seed: int = Field(0, description="Seed of the models' init, the problems and the held-out split.")

    @model_validator(mode="after")
    def _consistent(self) -> TinyCodiSettings:
        if self.min_steps > self.max_steps:
            raise ValueError(f"--min-steps {self.min_steps} exceeds --max-steps {self.max_steps}")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden} is not a multiple of --heads {self.heads}")
        if self.task is Task.HOPS and self.max_steps >= CHAIN:
            raise ValueError(f"--max-steps {self.max_steps}: a hops chain of {CHAIN} nodes has at most {CHAIN - 1} hops")
        held = self.validation + self.test
        for n_steps in self.lengths:
            # Held-out questions are never trained on: keep at least half of each length for training.
            if 2 * held > (count := distinct_questions(self.task, n_steps)):
                raise ValueError(
                    f"--min-steps {self.min_steps}: {self.task} has only {count} distinct {n_steps}-step questions, too few"
                    f" to hold out --validation + --test = {held} and train on the rest; raise --min-steps or lower"
                    " --validation/--test"
                )
        return self

    @property
    def lengths(self) -> range:
        return range(self.min_steps, self.max_steps + 1)

    @property
    def total_steps(self) -> int:
        return self.teacher_steps + self.stages * self.stage_steps

    def stage(self, step: int) -> int:
        """The curriculum stage of optimiser step ``step`` (0: teacher only)."""
        if step < self.teacher_steps:
            return 0
        return min(self.stages, 1 + (step - self.teacher_steps) // self.stage_steps)

    def replaced(self, stage: int) -> int:
        """CoT steps that latents replace in ``stage``: all of them in the last stage."""
        return self.max_steps if stage >= self.stages else stage * self.max_steps // self.stages

    def latents_at(self, stage: int, student_latents: int) -> int:
        """Latent steps the student runs in ``stage`` (a 0-latent model runs none)."""
        return student_latents if stage >= self.stages else stage * student_latents // self.stages

    def forcing(self, step: int) -> float:
        """Weight of the step's value in each fed-back thought at ``step`` (``latent_forcing``, decaying)."""
        return self.latent_forcing * self._remaining(step)

    def isolation(self, step: int) -> float:
        """Fraction of the batch whose thoughts are isolated at ``step`` (``thought_isolation``, decaying)."""
        return self.thought_isolation * self._remaining(step)

    def _remaining(self, step: int) -> float:
        """1 when the first stage starts, falling linearly to 0 when the last stage starts (over one stage if
        there is only one): the schedule of the training devices that the finished model runs without."""
        span = max(1, self.stages - 1) * self.stage_steps
        return 1 - min(1.0, max(0.0, (step - self.teacher_steps) / span))

    def learning_rate(self, step: int) -> float:
        """Warmup, a plateau, then linear decay over the last ``decay_fraction`` of the steps."""
        total = self.total_steps
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        decay_start = total - round(total * self.decay_fraction)
        if step < decay_start or total == decay_start:
            return self.lr
        progress = (step - decay_start) / (total - decay_start)
        return self.lr * (1 - (1 - self.final_lr_fraction) * progress)


def settings_from(values: dict[str, object]) -> TinyCodiSettings:
    """Validate CLI values into settings; a bad value is one ConfigError line.

    Raises:
        ConfigError: A value is out of range, or the values contradict each other.
    """
    from pydantic import ValidationError

    try:
        return TinyCodiSettings.model_validate(values)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"--{where.replace('_', '-')}: {message}" if where else message) from None
