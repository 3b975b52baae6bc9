"""The PyTorch side of validate: the base model and each adapter loaded the way its trainer would
(peft, or the kind's own torch module), for one adapter choice at a time.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from edgepeft.errors import EdgepeftError
from edgepeft.runtime.batch import positions


def _positions_t(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(positions(mask))


class Ref:
    """One PyTorch reference for one adapter choice.

    Attributes:
        model: the torch model to call (peft's model for peft kinds, edgepeft's bottleneck
            wrapper for bottleneck adapters, the base for ``None``).
        prompt_learning: a PEFT prompt-learning model (prefix / prompt / P-tuning): PEFT drops
            given position ids for prompts, so it is run on each unpadded row alone.
        prefix: per layer ``(key, value)`` ``(1, H, p, D)`` to seed the cache with (a LoRA +
            prefix composition, which PEFT cannot run as one model), else None. Also run on each
            unpadded row alone: a row's left padding would sit between the prefix and its tokens,
            and a sliding window over cache slots (transformers' masks) would count it.
        enter: a context manager factory to run inside (e.g. a mix's merged deltas); entered
            once by :meth:`held`, however many calls run inside it.
    """

    def __init__(self, model, prompt_learning=False, prefix=None, enter=None):
        self.model, self.prompt_learning, self.prefix = model, prompt_learning, prefix
        self.enter = enter or contextlib.nullcontext
        self._inside = False  # within held(): calls inside do not enter again

    @contextlib.contextmanager
    def held(self):
        """Run inside ``enter`` once for everything within: a mix of 32 LoRAs costs seconds to
        apply, once per case instead of once per forward pass."""
        if self._inside:
            yield
            return
        with self.enter():
            self._inside = True
            try:
                yield
            finally:
                self._inside = False

    @torch.no_grad()
    def logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Causal LM logits ``(B, S, V)`` at every position of the (left-padded) batch."""
        with self.held():
            if self.prompt_learning or self.prefix is not None:
                out = None
                for i in range(ids.shape[0]):
                    real = ids[i][mask[i].astype(bool)]
                    row = self._row(real)  # (len(real), V)
                    if out is None:
                        out = np.zeros((*ids.shape, row.shape[-1]), np.float32)
                    out[i, mask[i].astype(bool)] = row
                return out
            out = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             position_ids=_positions_t(mask))
            return out.logits.float().numpy()  # (B, S, V)

    def _row(self, real: np.ndarray) -> np.ndarray:
        """Logits ``(S, V)`` of one unpadded row ``(S,)``, after the prefix when there is one."""
        if self.prefix is None:
            return self.model(input_ids=torch.from_numpy(real[None])).logits[0, -len(real):].float().numpy()
        from transformers import DynamicCache

        p = self.prefix[0][0].shape[2]
        cache = DynamicCache(ddp_cache_data=[(k.clone(), v.clone()) for k, v in self.prefix],
                             config=self.model.config)
        pos = torch.arange(p, p + len(real))[None]  # (1, S): the tokens follow the prefix
        out = self.model(input_ids=torch.from_numpy(real[None]), attention_mask=torch.ones(1, p + len(real),
                         dtype=torch.long), position_ids=pos, cache=cache, use_cache=True)
        return out.logits[0].float().numpy()

    @torch.no_grad()
    def classify_logits(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Classifier logits ``(B, num_labels)`` of a right-padded batch."""
        with self.held():
            out = self.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
            return out.logits.float().numpy()

    def greedy(self, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
        """Greedy decoding by full recomputation (no cache): the plain definition. -> (B, n)."""
        new = []
        with self.held():
            for _ in range(n):
                nxt = self.logits(ids, mask)[:, -1].argmax(-1)[:, None].astype(np.int64)  # (B, 1)
                new.append(nxt)
                ids = np.concatenate([ids, nxt], 1)
                mask = np.concatenate([mask, np.ones_like(nxt)], 1)
        return np.concatenate(new, 1)


class Reference:
    """The server side: the base model plus every adapter loaded the way its trainer would.

    Each adapter's kind says how (``Reference``): kinds whose adapters share one model (LoRA /
    DoRA: one ``PeftModel``, as in the demo, and cheap on memory) get one model per kind; every
    other adapter gets its own model on a copy of the base (PEFT cannot hold IA3 and LoRA, or a
    prompt and LoRA, in one model; bottleneck adapters use edgepeft's own torch module).
    """

    def __init__(self, reference: Path, manifest: dict, adapter_dirs: dict[str, Path], given: Path | None = None):
        """``reference``: the base model folder; ``given``: what the user passed, for messages (a
        GGUF file whose dequantized folder ``reference`` is), default ``reference``."""
        from edgepeft.export.base import fingerprint, load_causal_lm, load_classifier
        from edgepeft.kinds import kind_module

        self.task = manifest["task"]
        self.manifest = manifest
        self.reference = reference
        if self.task == "causal-lm":
            base, fresh = load_causal_lm(reference), []
        else:
            base, fresh = load_classifier(reference, manifest["base"].get("num_labels"))
        fp = fingerprint(base, fresh)
        if fp != manifest["base"]["fingerprint"]:
            raise EdgepeftError(f"{given or reference}: its weights (fingerprint {fp[:19]}...) are not the base "
                                f"this artifact was exported from ({manifest['base']['fingerprint'][:19]}"
                                "...). Pass the same --reference folder (or GGUF file) that export used.")
        self.base = base
        self.dirs = adapter_dirs
        # an adapter written by `edgepeft adapter mix` is its mix in PyTorch (get), not a model of its own
        self.kinds = {n: kind_module(e["kind"]) for n, e in manifest["adapters"].items() if not e.get("mix_of")}
        self._models: dict[str, object] = {}  # own models, by adapter name
        self._shared: dict[object, object] = {}  # shared models, by kind module
        self._greedy: dict[tuple, np.ndarray] = {}  # greedy tokens, by case and inputs (see greedy)

    def _fresh_base(self):
        import copy

        return copy.deepcopy(self.base)

    def _shared_model(self, kind):
        """The one model holding every adapter of ``kind`` (a kind module with a shared Reference)."""
        if kind not in self._shared:
            ref, model = kind.REFERENCE, None
            for name in [n for n, k in self.kinds.items() if k is kind]:  # manifest order
                if model is None:
                    model = ref.load(self._fresh_base(), self.dirs[name], name)
                else:
                    ref.add(model, self.dirs[name], name)
            self._shared[kind] = model.eval()
        return self._shared[kind]

    def _single(self, name: str):
        """(model, prompt_learning) for one adapter."""
        ref = self.kinds[name].REFERENCE
        if ref.shared:
            model = self._shared_model(self.kinds[name])
            ref.select(model, name)
            return model, ref.prompt_learning
        if name not in self._models:
            self._models[name] = ref.load(self._fresh_base(), self.dirs[name], None).eval()
        return self._models[name], ref.prompt_learning

    def _seed(self, name: str):
        """Per layer ``(key, value)`` ``(1, H, p, D)``: the KV-cache seed of adapter ``name``."""
        from edgepeft.kinds import read_adapter

        adapter = read_adapter(name, self.dirs[name], self.base, self.task)
        seed = self.kinds[name].side(adapter, self.base).prefix
        return [(torch.from_numpy(k), torch.from_numpy(v)) for k, v in seed]

    def get(self, choice) -> Ref:
        """The reference for None, a name, or a mix / composition ``{name: weight}``."""
        if choice is None:
            return Ref(self.base)
        if isinstance(choice, str) and self.manifest["adapters"][choice].get("mix_of"):
            mix = self.manifest["adapters"][choice]["mix_of"]
            gone = [n for n in mix if n not in self.kinds]
            if gone:
                raise EdgepeftError(f"adapter {choice!r} is a mix of {', '.join(mix)}, and {gone[0]!r} is no longer in "
                                    "the artifact: its PyTorch reference is that mix. Validate before removing them.")
            return self.get(dict(mix))
        if isinstance(choice, str):
            model, prompt = self._single(choice)
            return Ref(model, prompt_learning=prompt)
        seeds = [n for n in choice if self.manifest["adapters"][n].get("prefix")]
        mixed = {n: w for n, w in choice.items() if n not in seeds}
        kinds = {self.kinds[n] for n in mixed}
        if (len(seeds) > 1 or any(not self.kinds[n].REFERENCE.seed_composes for n in seeds) or len(kinds) > 1
                or any(k.REFERENCE.mix is None for k in kinds)):
            raise EdgepeftError(f"no PyTorch reference for the combination {choice}: validate checks "
                                "weighted mixes of adapters of one kind with a mix reference (LoRA), "
                                "optionally with one prefix that composes (prefix tuning).")
        prefix = self._seed(seeds[0]) if seeds else None
        if not mixed:
            return Ref(self.base, prefix=prefix)
        kind = kinds.pop()
        model = self._shared_model(kind)
        return Ref(model, prefix=prefix, enter=lambda: kind.REFERENCE.mix(model, mixed))

    def greedy(self, choice, ids: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
        """:meth:`Ref.greedy` of ``choice``, kept: the per-row case and later artifacts of the
        same adapters ask for the same tokens, the costliest part of a case. -> ``(B, n)``."""
        key = (repr(choice), ids.shape, ids.tobytes(), mask.tobytes(), n)
        if key not in self._greedy:
            self._greedy[key] = self.get(choice).greedy(ids, mask, n)
        return self._greedy[key]
