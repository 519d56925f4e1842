"""Checkpoints of our trainers: TRL's files, then our state (the entropy coefficient; subclasses add theirs), then
the completion marker, last; resume checks every file and loads our state as data (``weights_only=True``)."""

from __future__ import annotations

import os

import torch

from ..checkpoints import clear_marker, load_state_file, newest_complete, rotate, verify_checkpoint, write_marker

STATE_FILE = "llm_entreg_state.pt"


class CheckpointStateMixin:
    """The checkpoint half of :class:`~llm_entreg.trainers.mixin.EntropyRegularizationMixin`."""

    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint, then our state, then the completion marker, last; rotation counts complete ones only."""
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.args.should_save:
            clear_marker(folder)
        limit, self.args.save_total_limit = self.args.save_total_limit, None  # no rotation before the marker
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if not self.args.should_save:
            return
        os.makedirs(folder, exist_ok=True)
        self._save_extra_state(folder)
        write_marker(folder, self.state.global_step)
        rotate(self._get_output_dir(trial=trial), limit, keep=self.state.best_model_checkpoint)

    def _save_extra_state(self, folder: str) -> None:
        """Our state beside TRL's (subclasses add theirs): the entropy coefficient, and TRL's running token count
        (DPO's ``num_tokens``, which TRL itself does not checkpoint), written atomically."""
        path = os.path.join(folder, STATE_FILE)
        state = {"version": 1, "coefficient": self.entropy_coefficient.state_dict(),
                 "total_train_tokens": getattr(self, "_total_train_tokens", None)}
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)

    def _entropy_load_state(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: missing; this checkpoint was not written by an llm_entreg trainer, or is incomplete"
            )
        state = load_state_file(path, "entropy-coefficient state")
        if isinstance(state.get("total_train_tokens"), (int, float)):
            self._total_train_tokens = state["total_train_tokens"]
        try:
            restored = self.args.build_entropy_coefficient(self.args.max_steps)
            restored.load_state_dict(state["coefficient"])
        except Exception as exc:  # noqa: BLE001 - any failure here means an unusable file
            raise ValueError(f"{path}: corrupt or incompatible entropy-coefficient state ({exc})") from exc
        if restored.kind == "constant":
            # A constant β has no trajectory to continue: the configured value wins (a resumed run may change it)
            return
        self.entropy_coefficient = restored

    def train(self, resume_from_checkpoint=None, *args, checkpoint_verified: bool = False, **kwargs):
        """TRL's ``train``; ``resume_from_checkpoint=True`` takes the newest *complete* checkpoint, and the one
        resumed from is checked file by file first, unless the caller has just done so (``checkpoint_verified``)."""
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False and not checkpoint_verified:
            if resume_from_checkpoint is True:
                resume_from_checkpoint, _ = newest_complete(self.args.output_dir)
                if resume_from_checkpoint is None:
                    raise ValueError(f"resume_from_checkpoint: no complete checkpoint in {self.args.output_dir}")
                resume_from_checkpoint = str(resume_from_checkpoint)
            if not os.path.isdir(resume_from_checkpoint):
                raise FileNotFoundError(f"resume_from_checkpoint: {resume_from_checkpoint} is not a directory")
            verify_checkpoint(resume_from_checkpoint)
        if resume_from_checkpoint is not None and resume_from_checkpoint is not False:
            self._entropy_load_state(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

