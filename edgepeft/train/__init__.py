"""``edgepeft train``: train a small adapter on CPU from a JSON-lines file, ready to export.

Data, one JSON object per line:

- ``{"text": "..."}``: causal LM; the loss is on every token of the text (an EOS is appended so
  generation learns to stop).
- ``{"text": "...", "label": ...}``: sequence classification; labels are all ints (the ids
  themselves, ``num_labels = max + 1``) or all strings (ids in sorted order).

Kinds: those of :data:`edgepeft.kinds.TRAIN`; each kind file describes its training
(:class:`edgepeft.kinds.common.TrainSpec`: default learning rate, PEFT config, target modules,
tasks). PEFT's kinds (``lora``, ``dora``, ``ia3``, ``prompt``, ``prefix``) are trained and saved
with peft (``get_peft_model`` + ``save_pretrained``), so the output loads with
``PeftModel.from_pretrained``; ``bottleneck`` adds, trains and saves edgepeft's own module in its
PEFT-shaped format. For classification the head is trained and saved as ``modules_to_save``:
every top-level module whose name ends with ``classifier`` or ``score`` (peft's suffix rule, so
DistilBERT's ``pre_classifier`` too). Randomly initialised head layers outside that rule are
neither trained nor saved; the head is drawn after ``torch.manual_seed(seed)``, so loading the
base the same way reproduces them.

The output folder holds the adapter files, ``train_log.json`` (config, labels, per-step
losses, seconds) and ``edgepeft.json`` (the fingerprint of the base weights, which ``edgepeft
export`` checks). It is written into a temporary sibling folder and renamed at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgepeft.errors import EdgepeftError
from edgepeft.gguf import check_magic, is_gguf, resolve_base
from edgepeft.kinds import TRAIN
from edgepeft.kinds.common import TRAIN_TASKS

TASKS = ("auto", *TRAIN_TASKS)
HEAD_NAMES = ("classifier", "score")  # peft's modules_to_save for SEQ_CLS
LOG_NAME = "train_log.json"


def _int_at_least(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class TrainConfig:
    """What ``edgepeft train`` does.

    Attributes:
        kind: a train kind of :data:`edgepeft.kinds.TRAIN` (``lora``, ``dora``, ``ia3``, ``prompt``,
            ``prefix``: causal LM only, ``bottleneck``).
        model: Hugging Face model folder of the base model (with its tokenizer), or a GGUF file
            (trained on its dequantized folder, :func:`edgepeft.gguf.resolve_base`).
        data: JSON-lines file: ``{"text": ...}`` rows, or ``{"text": ..., "label": ...}`` rows.
        out: adapter folder to create (must not exist unless ``force``).
        task: ``causal-lm``, ``classification`` or ``auto`` (classification when rows have ``label``).
        epochs: passes over the data.
        steps: stop after this many optimizer steps (a cap on ``epochs``), None for no cap.
        lr: AdamW learning rate; None uses the kind's default (``TrainSpec.lr``).
        batch_size: rows per step.
        max_length: tokens per row; longer texts are truncated.
        r: LoRA / DoRA rank (``lora_alpha = 2 r``).
        num_virtual_tokens: soft-prompt / prefix length (prompt, prefix).
        reduction_factor: bottleneck size ``d // reduction_factor`` (bottleneck, Houlsby layout).
        seed: seeds the head init, the adapter init, shuffling and dropout.
        force: replace ``out`` if it exists.
        target_modules: layers to adapt, for kinds whose ``TrainSpec.target_modules`` is set (peft's
            names/suffixes; bottleneck: full names or dotted suffixes); None uses the model family's
            default.
    """

    kind: str
    model: Path
    data: Path
    out: Path
    task: str = "auto"
    epochs: int = 1
    steps: int | None = None
    lr: float | None = None
    batch_size: int = 8
    max_length: int = 128
    r: int = 8
    num_virtual_tokens: int = 8
    reduction_factor: int = 16
    seed: int = 0
    force: bool = False
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self):
        for f in ("model", "data", "out"):
            object.__setattr__(self, f, Path(getattr(self, f)))
        if self.kind not in TRAIN:
            raise EdgepeftError(f"--kind {self.kind!r} is not one of {', '.join(TRAIN)}.")
        if self.task not in TASKS:
            raise EdgepeftError(f"--task {self.task!r} is not one of {', '.join(TASKS)}.")
        if self.task != "auto":
            _check_task(self.kind, self.task)
        if is_gguf(self.model):
            check_magic(self.model)  # the rest of the file is checked when it is dequantized
        elif not (self.model / "config.json").is_file():
            raise EdgepeftError(f"{self.model}: not a Hugging Face model folder (no config.json). Pass "
                                "the folder of the base model, as saved by save_pretrained, or a GGUF file.")
        if not self.data.is_file():
            raise EdgepeftError(f"{self.data}: data file not found. Pass a JSON-lines file with one "
                                '{"text": ...} (or {"text": ..., "label": ...}) object per line.')
        checks = (("epochs", self.epochs, 1), ("batch_size", self.batch_size, 1),
                  ("max_length", self.max_length, 2), ("r", self.r, 1),
                  ("num_virtual_tokens", self.num_virtual_tokens, 1),
                  ("reduction_factor", self.reduction_factor, 1), ("seed", self.seed, 0))
        for name, value, low in checks:
            if not _int_at_least(value, low):
                raise EdgepeftError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= {low}.")
        if self.steps is not None and not _int_at_least(self.steps, 1):
            raise EdgepeftError(f"--steps {self.steps!r}: expected an integer >= 1, or none for no cap.")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr)
                                        and self.lr > 0):
            raise EdgepeftError(f"--lr {self.lr!r}: expected a positive number.")
        if self.target_modules is not None:
            targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise EdgepeftError(f"--target-modules {self.target_modules!r}: expected module names.")
            if not TRAIN[self.kind].target_modules:
                takes = [k for k, spec in TRAIN.items() if spec.target_modules]
                listing = " and ".join(filter(None, [", ".join(takes[:-1]), takes[-1]]))
                raise EdgepeftError(f"--target-modules: {self.kind} tuning adapts no layers; target "
                                    f"modules apply to {listing}.")
            object.__setattr__(self, "target_modules", targets)
        if self.out.exists() and not self.force:
            raise EdgepeftError(f"{self.out}: already exists. Pass --force to replace it, or another --out.")
        if self.out.resolve() in (self.model.resolve(), self.data.resolve()):
            raise EdgepeftError(f"{self.out}: is the model folder or the data file; pick another --out.")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the kind's default."""
        return float(self.lr) if self.lr is not None else TRAIN[self.kind].lr


def _check_task(kind: str, task: str) -> None:
    """Raise the kind's own message when it does not train on ``task``."""
    if task not in TRAIN[kind].tasks:
        raise EdgepeftError(TRAIN[kind].refusal)


@dataclass(frozen=True)
class Dataset:
    """Rows read from a JSON-lines file.

    Attributes:
        texts: one text per row.
        labels: label id per row (classification), else None.
        names: label names by id (classification), else None.
    """

    texts: list[str]
    labels: list[int] | None
    names: list[str] | None


def read_data(path: Path) -> Dataset:
    """Read and check a JSON-lines training file.

    Args:
        path: one JSON object per line, ``{"text": str}`` or ``{"text": str, "label": int | str}``;
            blank lines are skipped.

    Returns:
        The rows; string labels get ids in sorted order, int labels are the ids.

    Raises:
        EdgepeftError: unreadable file, no rows, a line that is not an object with a non-empty
            ``text``, rows with and without ``label`` mixed, mixed label types, bad labels. The
            message names the file and line.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EdgepeftError(f"{path}: cannot read ({e}). Pass a UTF-8 JSON-lines file.") from None
    texts: list[str] = []
    raw: list = []
    first_line = None
    has_label = None
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgepeftError(f"{where}: not valid JSON ({e.msg}). Each line must be one object such "
                                'as {"text": "..."}.') from None
        if not isinstance(row, dict):
            raise EdgepeftError(f"{where}: expected a JSON object, found {type(row).__name__}.")
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            what = "has no \"text\" key" if "text" not in row else "has an empty or non-string \"text\""
            raise EdgepeftError(f"{where}: {what}. Every row needs a non-empty string \"text\" "
                                f"(keys found: {', '.join(map(str, row)) or 'none'}).")
        labelled = "label" in row
        if has_label is None:
            has_label, first_line = labelled, no
        elif labelled != has_label:
            raise EdgepeftError(
                f"{where}: {'has' if labelled else 'has no'} \"label\" but line {first_line} "
                f"{'has none' if labelled else 'has one'}: either every row is labelled "
                "(classification) or none is (causal LM).")
        if labelled:
            label = row["label"]
            if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
                raise EdgepeftError(f"{where}: label {label!r}: expected an integer id or a non-empty string.")
            if isinstance(label, int) and label < 0:
                raise EdgepeftError(f"{where}: label {label}: integer labels are class ids, >= 0.")
            if raw and type(label) is not type(raw[0]):
                raise EdgepeftError(f"{where}: label {label!r} is a {type(label).__name__} but line "
                                    f"{first_line}'s is a {type(raw[0]).__name__}: use all ints or all strings.")
            raw.append(label)
        texts.append(text)
    if not texts:
        raise EdgepeftError(f"{path}: no rows (the file is empty). Add one JSON object per line, "
                            'e.g. {"text": "..."} or {"text": "...", "label": "positive"}.')
    if not has_label:
        return Dataset(texts, None, None)
    if isinstance(raw[0], int):
        names = [str(i) for i in range(max(raw) + 1)]
        ids = list(raw)
    else:
        names = sorted(set(raw))
        index = {n: i for i, n in enumerate(names)}
        ids = [index[x] for x in raw]
    if len(names) < 2:
        raise EdgepeftError(f"{path}: every row has label {raw[0]!r}; classification needs at least "
                            "two labels.")
    return Dataset(texts, ids, names)


def _tqdm(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=quiet, leave=False, dynamic_ncols=True)


def _peft_model(model, cfg: TrainConfig, classification: bool):
    """Wrap ``model`` with the kind's PEFT config (adapter init uses the current seed)."""
    from peft import get_peft_model

    pc = TRAIN[cfg.kind].peft_config(model, cfg, classification)
    try:
        return get_peft_model(model, pc)
    except (ValueError, TypeError, KeyError) as e:
        raise EdgepeftError(f"{cfg.model}: peft cannot add a {cfg.kind} adapter to this "
                            f"{type(model).__name__} ({e}). Pass --target-modules, or pick another kind.") from None


def _head_modules(model) -> list[str]:
    """Top-level head modules peft trains and saves for SEQ_CLS (``modules_to_save``).

    peft matches ``classifier`` / ``score`` as a name *suffix*, so DistilBERT's ``pre_classifier``
    is trained and saved too (peft 0.21); the same rule here keeps the two formats alike.
    """
    return [n for n, _ in model.named_children() if any(n.endswith(h) for h in HEAD_NAMES)]


def _encode(tokenizer, data: Dataset, cfg: TrainConfig, classification: bool) -> list[list[int]]:
    """Token ids per row: truncated to ``max_length``; causal LM rows end with EOS."""
    ids_list = []
    enc = tokenizer(data.texts, add_special_tokens=True, truncation=True,
                    max_length=cfg.max_length - (0 if classification else 1))["input_ids"]
    for i, ids in enumerate(enc):
        ids = list(ids)
        if not classification and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        if len(ids) < (1 if classification else 2):
            raise EdgepeftError(f"{cfg.data}: row {i + 1} ({data.texts[i][:40]!r}) tokenizes to "
                                f"{len(ids)} token(s); a causal LM row needs at least 2 with EOS.")
        ids_list.append(ids)
    return ids_list


def _batch(rows: list[list[int]], pad_id: int, labels: list[int] | None, left: bool = False):
    """Padded batch: input_ids, attention_mask (B, T) and labels ((B,) ids or (B, T), -100 on pads).

    Right padding, or left (``left``) where the model pools the last position blindly.
    """
    import torch

    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), t), dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        span = slice(t - len(r), t) if left else slice(0, len(r))
        ids[i, span] = torch.tensor(r)
        mask[i, span] = 1
    if labels is not None:
        y = torch.tensor(labels, dtype=torch.long)  # (B,)
    else:
        y = ids.masked_fill(mask == 0, -100)  # (B, T): loss on every real token
    return {"input_ids": ids, "attention_mask": mask, "labels": y}


def _jsonable(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def train(cfg: TrainConfig, quiet: bool = False) -> dict:
    """Train one adapter on CPU and write it to ``cfg.out``.

    Args:
        cfg: what to train (see :class:`TrainConfig`).
        quiet: no progress bar on stderr.

    Returns:
        ``{"kind", "task", "trainable_params", "steps", "seconds", "final_loss", "out", "labels"}``
        (``labels``: names by id for classification, else None).

    Raises:
        EdgepeftError: bad data, a model or tokenizer that cannot be loaded, an unsupported
            kind/task combination, or a loss that is not finite.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    started = time.perf_counter()
    data = read_data(cfg.data)
    task = cfg.task if cfg.task != "auto" else ("classification" if data.labels is not None else "causal-lm")
    classification = task == "classification"
    if classification and data.labels is None:
        raise EdgepeftError(f"{cfg.data}: --task classification needs a \"label\" on every row; the rows "
                            "have none.")
    _check_task(cfg.kind, task)
    folder = resolve_base(cfg.model, quiet).folder  # a GGUF file: its dequantized folder in the cache

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise EdgepeftError(f"{cfg.model}: cannot load its tokenizer ({e}). The model folder must hold "
                            "the tokenizer files (tokenizer.json, tokenizer_config.json).") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise EdgepeftError(f"{cfg.model}: the tokenizer has neither a pad nor an EOS token; add one.")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    rows = _encode(tokenizer, data, cfg, classification)

    torch.manual_seed(cfg.seed)  # the head (classification) and the adapters are initialised from here
    names = data.names
    try:
        if classification:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                folder, num_labels=len(names), id2label=dict(enumerate(names)),
                label2id={n: i for i, n in enumerate(names)}, problem_type="single_label_classification",
                dtype=torch.float32, output_loading_info=True)
            model.config.pad_token_id = tokenizer.pad_token_id
            fresh = sorted(set(info.get("missing_keys", [])) & {n for n, _ in model.named_parameters()})
        else:
            model, fresh = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), []
    except (OSError, ValueError, KeyError) as e:
        raise EdgepeftError(f"{cfg.model}: cannot load it as a "
                            f"{'sequence-classification' if classification else 'causal'} model ({e}).") from None
    from edgepeft.export.base import fingerprint

    base_fp = fingerprint(model, fresh)  # as export computes it: the weights before any adapter
    vocab = model.get_input_embeddings().num_embeddings
    top = max(max(r) for r in rows)
    if top >= vocab:
        raise EdgepeftError(f"{cfg.model}: the tokenizer produces id {top} but the model has {vocab} "
                            "embeddings: tokenizer and model do not belong together.")

    spec = TRAIN[cfg.kind]
    if spec.peft_config is None:  # the kind's own modules, not PEFT's
        trainable = spec.add(model, cfg, _head_modules(model) if classification else [])
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable.values():
            p.requires_grad_(True)
        net = model
    else:
        net = _peft_model(model, cfg, classification)
    # Decoder classifiers (a ``score`` head) pool the last non-pad token, found from input_ids; with
    # prompt tuning peft feeds embeddings instead and they pool the last position: pad on the left.
    left = classification and spec.embeds_input and hasattr(model, "score")
    params = [p for p in net.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)

    per_epoch = math.ceil(len(rows) / cfg.batch_size)
    total = per_epoch * cfg.epochs if cfg.steps is None else min(cfg.steps, per_epoch * cfg.epochs)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: list[float] = []
    net.train()
    bar = _tqdm(total, f"train {cfg.kind}", quiet)
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(len(rows), generator=gen).tolist()
            for start in range(0, len(rows), cfg.batch_size):
                if len(losses) >= total:
                    break
                idx = order[start:start + cfg.batch_size]
                batch = _batch([rows[i] for i in idx], tokenizer.pad_token_id,
                               [data.labels[i] for i in idx] if classification else None, left)
                loss = net(**batch).loss
                if not torch.isfinite(loss):
                    raise EdgepeftError(f"step {len(losses) + 1}: the loss is {loss.item()}; lower --lr "
                                        f"(now {cfg.learning_rate:g}).")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.item()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
    finally:
        bar.close()
    net.eval()
    seconds = time.perf_counter() - started

    summary = {"kind": cfg.kind, "task": task, "trainable_params": n_trainable, "steps": len(losses),
               "seconds": round(seconds, 3), "final_loss": losses[-1], "out": str(cfg.out),
               "labels": names}
    log = {"summary": summary, "config": {**_jsonable(cfg), "lr": cfg.learning_rate},
           "id2label": dict(enumerate(names)) if names else None,
           "label2id": {n: i for i, n in enumerate(names)} if names else None,
           "losses": losses}
    _write_out(cfg, net, model, classification, log, base_fp)
    return summary


def _write_out(cfg: TrainConfig, net, model, classification: bool, log: dict, base_fp: str) -> None:
    """Save the adapter and the log into a temporary sibling of ``cfg.out``, then rename it."""
    out = cfg.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    old = None
    try:
        spec = TRAIN[cfg.kind]
        if spec.save is not None:
            spec.save(model, tmp, cfg, classification, _head_modules(model) if classification else [])
        else:
            net.save_pretrained(str(tmp))
        (tmp / LOG_NAME).write_text(json.dumps(log, indent=2) + "\n", encoding="utf-8")
        from edgepeft.export.base import write_binding

        write_binding(tmp, cfg.model, base_fp, "classification" if classification else "causal-lm")
        if out.exists():  # --force: move the old one aside, put the new one in place, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
