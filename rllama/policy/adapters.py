"""Named LoRA adapters of a policy, and the reference policy (the adapter disabled)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from torch import nn

from rllama.errors import ModelNotFoundError, RLlamaError
from rllama.fileio import writing_dir
from rllama.policy.persistence import ADAPTER_DIR


def _blocks_text(layers) -> str:
    return "every block" if layers is None else f"blocks {sorted(layers)}"


def _adapter_folder(root: Path) -> Path:
    for cfg in sorted(root.rglob("adapter_config.json")):
        return cfg.parent
    raise RLlamaError(f"PEFT wrote no adapter_config.json under {root}")


class AdapterMixin:
    """Named LoRA adapters of a :class:`~rllama.policy.PolicyModel`: adding, switching, saving and loading them,
    and the reference policy (the adapter disabled)."""

    @property
    def active_adapter(self) -> str:
        """The adapter that acts and trains (PEFT's active adapter; ``"default"`` at first)."""
        return self.lm.active_adapter

    def list_adapters(self) -> list[str]:
        """Names of the LoRA adapters this model holds."""
        return list(self.lm.peft_config)

    def add_adapter(self, name: str, lora_config=None) -> None:
        """Add a new LoRA adapter ``name`` (zero-initialised B: it starts as the base model)."""
        if not isinstance(name, str) or not name.strip() or "." in name:
            raise ValueError(f"adapter name {name!r}: expected a non-empty string without dots")
        if name in self.list_adapters():
            raise RLlamaError(f"adapter {name!r} already exists; adapters: {self.list_adapters()}")
        active = self.active_adapter
        self.lm.add_adapter(name, lora_config or self._default_lora_config(self._causal_lm()))
        self.lm.set_adapter(active)  # keeps the active adapter trainable and the new one frozen
        self.to(self.device)
        self._adapters_changed()

    def set_adapter(self, name: str) -> None:
        """Make ``name`` the adapter that acts and trains (its parameters trainable, the others frozen)."""
        self._require_adapter(name)
        self.lm.set_adapter(name)

    def delete_adapter(self, name: str) -> None:
        """Remove adapter ``name`` (not the active one)."""
        self._require_adapter(name)
        if name == self.active_adapter:
            raise RLlamaError(f"adapter {name!r} is active; set_adapter(another) before deleting it")
        self.lm.delete_adapter(name)
        self._adapters_changed()

    def adapter_parameters(self, name: str | None = None) -> list[nn.Parameter]:
        """The LoRA parameters of adapter ``name`` (default: the active one)."""
        name = name or self.active_adapter
        self._require_adapter(name)
        return [p for n, p in self.lm.named_parameters() if "lora_" in n and f".{name}." in f"{n}."]

    @contextlib.contextmanager
    def using_adapter(self, name: str | None):
        """Context in which adapter ``name`` is active (``None``: the base model, adapters disabled)."""
        if name is None:
            with self.reference():
                yield
            return
        self._require_adapter(name)
        previous = self.active_adapter
        if name != previous:
            self.lm.set_adapter(name)
        try:
            yield
        finally:
            if name != previous:
                self.lm.set_adapter(previous)

    def save_adapter(self, name: str, path: str | os.PathLike) -> Path:
        """Write adapter ``name`` alone (PEFT format, safetensors) to folder ``path``, atomically."""
        self._require_adapter(name)
        path = Path(path)
        with writing_dir(path) as tmp:
            self._write_adapter(name, tmp)
        return path

    def _write_adapter(self, name: str, folder: Path) -> None:
        """Write adapter ``name`` alone (PEFT format) into ``folder``, flat whatever its name."""
        folder.mkdir(parents=True, exist_ok=True)
        self.lm.save_pretrained(str(folder), selected_adapters=[name], safe_serialization=True)
        found = _adapter_folder(folder)
        if found != folder:  # PEFT nests non-default adapters in a subfolder; keep one flat layout
            for f in found.iterdir():
                shutil.move(str(f), str(folder / f.name))
            shutil.rmtree(found)

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load an adapter saved by :meth:`save_adapter` (or any PEFT LoRA folder) as adapter ``name``."""
        path = Path(path)
        if not (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"{str(path)!r} holds no PEFT adapter (adapter_config.json is missing)")
        if name in self.list_adapters():
            raise RLlamaError(f"adapter {name!r} already exists; delete_adapter({name!r}) first or pick another name")
        active = self.active_adapter
        try:
            self.lm.load_adapter(str(path), adapter_name=name, is_trainable=True)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise RLlamaError(f"cannot load the adapter at {str(path)!r} into this model: {exc}") from exc
        self.lm.set_adapter(active)
        self.to(self.device)
        self._adapters_changed()

    def _check_adapted_blocks(self, path: Path) -> None:
        """A checkpoint whose adapter covers other blocks than this policy's gets an error saying how to match it."""
        config_file = path / ADAPTER_DIR / "adapter_config.json"
        if not config_file.is_file():
            return
        saved = json.loads(config_file.read_text()).get("layers_to_transform")
        ours = getattr(self.lm.peft_config[self.active_adapter], "layers_to_transform", None)
        norm = (lambda v: None if v is None else sorted([v] if isinstance(v, int) else v))
        if norm(saved) != norm(ours):
            layers = "'all'" if saved is None else f"{norm(saved)}"
            raise RLlamaError(
                f"checkpoint {str(path)!r} adapts {_blocks_text(norm(saved))}, this policy adapts "
                f"{_blocks_text(norm(ours))}; build the agent with lora_config=default_lora_config(layers={layers}) "
                "to load it (checkpoints made before rllama adapted the top 8 blocks by default adapt every block)")

    def _require_adapter(self, name: str) -> None:
        if name not in self.list_adapters():
            raise RLlamaError(f"no adapter named {name!r}; adapters: {self.list_adapters()}")

    @contextlib.contextmanager
    def reference(self):
        """Context in which the model is the reference policy: the base model, adapter disabled (and
        the policy head, if any, left out)."""
        outer, self._in_reference = self._in_reference, True
        try:
            with self.lm.disable_adapter():
                yield
        finally:
            self._in_reference = outer
