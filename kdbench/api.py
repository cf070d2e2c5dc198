"""The contracts between the core and its plugins: models, tasks and methods.

A plugin contributes classes that subclass :class:`ModelFactory`, :class:`Task` or
:class:`Method` through the hooks in :mod:`kdbench.hookspecs`. The core only ever talks
to these interfaces; it never imports a plugin by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer, model_validator
from torch import Tensor, nn

# --------------------------------------------------------------------------- errors


class KDBenchError(Exception):
    """An error caused by the user's input; the CLI prints it and exits with code 2."""


class IncompatibleModelError(KDBenchError):
    """A method cannot use a model (e.g. PKD on a CNN): raised before training starts."""


class DataError(KDBenchError):
    """Malformed or missing data; the message names the file and the row."""


# --------------------------------------------------------------------------- options


class Options(BaseModel):
    """Base for every plugin's options/hyper-parameters: unknown fields are errors, and so
    are infinite or NaN numbers (``temperature: .inf`` would only fail, or silently train
    on NaN, much later). A plugin that really wants them sets ``allow_inf_nan=True`` in its
    own ``model_config`` (or on one field)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        return refuse_bool_numbers(cls, data)

    @model_serializer(mode="wrap")
    def _omit_added_defaults(self, handler: SerializerFunctionWrapHandler) -> Any:
        return omit_added_defaults(self, handler(self))


def _admits(annotation: Any, kinds: tuple[type, ...]) -> bool:
    """Whether a field annotation accepts a value of one of ``kinds`` as such."""
    if annotation in (Any, object):
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _admits(typing.get_args(annotation)[0], kinds)
    if origin in (typing.Union, types.UnionType):
        return any(_admits(a, kinds) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return any(isinstance(v, kinds) for v in typing.get_args(annotation))
    return isinstance(annotation, type) and issubclass(annotation, kinds)


def _bool_problems(value: Any, annotation: Any, where: str) -> list[str]:
    if isinstance(value, bool):
        numeric = _admits(annotation, (int, float)) and not _admits(annotation, (bool,))
        return [f"{where}: must be a number, not true/false (got {str(value).lower()})"] if numeric else []
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        # containers inside a union (``tuple[float, ...] | None``): check against each member that is one
        members = args[:1] if origin is typing.Annotated else args
        return next((p for a in members if typing.get_origin(a) in (list, tuple, dict) and (p := _bool_problems(value, a, where))), [])
    if origin in (list, tuple) and isinstance(value, (list, tuple)) and args:
        item = args[0] if origin is list or (len(args) == 2 and args[1] is Ellipsis) else None
        return [p for i, v in enumerate(value) for p in _bool_problems(v, item if item is not None else
                                                                        (args[i] if i < len(args) else Any), f"{where}[{i}]")]
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return [p for k, v in value.items() for p in _bool_problems(v, args[1], f"{where}.{k}")]
    return []


def refuse_bool_numbers(model: type[BaseModel], data: Any) -> Any:
    """``data`` unchanged, or a ``ValueError`` naming every field of ``model`` where a
    boolean was given for a number. Pydantic would turn ``alpha: true`` into 1.0 (YAML's
    ``yes``/``true``/``on`` are booleans), a silently different hyper-parameter. A model
    validator (``mode="before"``) of :class:`Options` and of the suite models calls it."""
    if not isinstance(data, dict):
        return data
    problems = []
    for name, f in model.model_fields.items():
        key = name if name in data else f.alias if f.alias in data else None
        if key is not None:
            problems += _bool_problems(data[key], f.annotation, name)
    if problems:
        raise ValueError("; ".join(problems))
    return data


def omit_added_defaults(model: BaseModel, data: Any) -> Any:
    """``data`` (``model`` dumped) without the fields declared with :func:`added` that hold
    their default: what keeps stored runs' hashes when such a field is introduced. Used by
    :class:`Options` and by the suite models that gained such fields (``Budget``)."""
    if isinstance(data, dict):
        for name, f in type(model).model_fields.items():
            if _is_added(f) and name in data and getattr(model, name) == f.default:
                del data[name]
    return data


def added_defaults(options_cls: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``options_cls`` declared with :func:`added`, with their defaults: what a
    stored run that does not name such a field ran with (its dumped options leave it out).
    Reports use it to show that value instead of a blank where runs of one method differ
    only in whether they named the field."""
    return {name: f.default for name, f in options_cls.model_fields.items() if _is_added(f)}


def location(default: Any = None, description: str = "") -> Any:
    """A field that says *where* something lives (a data folder, a local file), not *what*
    it is: it is left out of run hashes, so the same run on two machines with different
    paths has the same hash (and shares a results store)."""
    from pydantic import Field

    return Field(default, description=description, json_schema_extra={"kdbench_identity": False})


def added(default: Any, description: str = "", **constraints: Any) -> Any:
    """A field added to a plugin's options after runs were stored, whose default keeps the
    old behaviour: while it has its default it is left out of the dumped options (and so
    out of run hashes), so stored runs keep their hashes and are not run again. Any other
    value is dumped and hashed like an ordinary field. For a new field whose default
    *changes* what a run does, use an ordinary ``Field`` (the hash must change)."""
    from pydantic import Field

    return Field(default, description=description, json_schema_extra={"kdbench_added": True}, **constraints)


#: what a null (unset) parameter reads as in a leaderboard row name when its field does
#: not say (:func:`nullable`): ``teacher_grad_clip=off``, never ``=None``
NULL_READS = "off"


def nullable(description: str = "", reads: str = NULL_READS, **constraints: Any) -> Any:
    """A field whose default is null (the behaviour it switches is not used), and the word a
    report's row name shows for null: ``teacher_topk: int | None = nullable(..., reads="full")``
    names the row ``token-kd(teacher_topk=full)`` beside ``token-kd(teacher_topk=16)``.
    Display only: the dumped options, and so run hashes, are those of ``Field(None, ...)``."""
    from pydantic import Field

    return Field(None, description=description, json_schema_extra={"kdbench_null_reads": reads}, **constraints)


def null_reads(options_cls: type[BaseModel], name: str) -> str:
    """The word a null value of ``options_cls``'s field ``name`` reads as in row names: the
    field's :func:`nullable` ``reads``, else :data:`NULL_READS` (also for an unknown field)."""
    f = options_cls.model_fields.get(name)
    extra = f.json_schema_extra if f is not None else None
    word = extra.get("kdbench_null_reads") if isinstance(extra, dict) else None
    return word if isinstance(word, str) and word else NULL_READS


def _is_added(f: Any) -> bool:
    return isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("kdbench_added") is True


def wrapped_options(extras: dict[str, Any], options_cls: type[Options], wrapper: str, inner: str, own_fields: Iterable[str]) -> Options:
    """``extras`` (the fields a wrapping method, e.g. MetaDistil, does not declare itself)
    validated as the options of its inner method ``inner`` (``options_cls``). ValueError
    naming the wrapper, the inner method and every allowed field when a field is unknown
    or a value is bad (raised from a validator, it becomes the wrapper's validation error)."""
    from pydantic import ValidationError

    unknown = sorted(set(extras) - set(options_cls.model_fields))
    if unknown:
        raise ValueError(f"unknown field {', '.join(repr(u) for u in unknown)} for {wrapper} with inner method '{inner}'; allowed: "
                         f"{', '.join(own_fields)}, and the inner method's {', '.join(options_cls.model_fields) or '(none)'}")
    try:
        return options_cls(**extras)
    except ValidationError as err:
        why = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ValueError(f"inner method '{inner}' params: {why}") from None


def unhashed_fields(options_cls: type[BaseModel]) -> set[str]:
    """Names of an options class's :func:`location` fields."""
    return {name for name, f in options_cls.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("kdbench_identity") is False}


# --------------------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """A task's label layout: ``kind`` names the task's :class:`Objective` (the built-ins:
    ``classification`` with ``num_labels`` classes, ``regression`` with one output), and
    ``num_labels`` is the width of the model's head (classes; 1 for one value per example;
    a vocabulary size for a token objective). The objective, not this record, decides
    losses, metrics and directions; code that only holds a ``Problem`` (a test building a
    method by hand) gets the classification/regression behaviour of the core helpers."""

    kind: str
    num_labels: int

    @property
    def is_regression(self) -> bool:
        return self.kind == "regression"

    @property
    def label_layout(self) -> str:
        """``"value"`` for regression (one float per example), ``"class"`` otherwise."""
        return "value" if self.is_regression else "class"

    def num_outputs(self) -> int:
        """The width of the model's output layer, as :meth:`Objective.num_outputs` says it
        for the built-in objectives: 1 for regression, ``num_labels`` otherwise. Lets a
        factory called with a bare ``Problem`` (a test building a model by hand) size its
        head as it would for the run's objective."""
        return 1 if self.is_regression else self.num_labels


# --------------------------------------------------------------------------- models

#: Names of what a model can expose in :class:`ModelOutput` (see ``KDModel.capabilities``).
LOGITS = "logits"
HIDDEN_STATES = "hidden_states"
ATTENTION_SCORES = "attention_scores"
FEATURES = "features"
PREACT_FEATURES = "preact_features"
EMBEDDING = "embedding"
#: Causal language models: ``logits`` are per-token next-token distributions ``(B, R, V)``
#: over the response positions of the prompt/response layout (:mod:`kdbench.generation`).
TOKEN_LOGITS = "token_logits"
#: The model decodes responses: ``model.generate(inputs, max_new_tokens, greedy,
#: temperature, generator, use_cache)`` returns a :class:`kdbench.generation.Generation`.
GENERATION = "generation"
ATTENTION_PROBS = "attention_probs"
QUERIES = "queries"
KEYS = "keys"
VALUES = "values"

#: The method option that reads a teacher from a cache of its top-k log-probabilities,
#: renormalised over those k tokens (:func:`kdbench.generation.use_topk_teacher`); every
#: method that offers such a cache names its option so, and reports read it from a run's
#: stored parameters to say which runs learnt from a truncated teacher.
TEACHER_TOPK = "teacher_topk"


@dataclass
class ModelOutput:
    """Everything a distillation loss may read from a forward pass.

    ``logits``: (..., C or V): (B, num_labels) for per-example objectives (regression:
    (B, 1)); (B, L, V) for token-level ones, with ``mask``.
    ``hidden_states``: transformers only; embedding output then every layer, each (B, L, H).
    ``attention_scores``: transformers only; pre-softmax scores per layer, (B, heads, L, L),
    with masked key positions set to 0 (TinyBERT's convention).
    ``attention_mask``: (B, L) mask of real tokens, for losses over token positions.
    ``features``: CNNs only; the stem's output, then each stage's output, (B, C, H, W):
    post-activation, except for pre-activation networks (WRN) whose stage outputs are raw
    residual sums, as in RepDistiller (so FitNet/AT numbers stay comparable).
    ``preact_features``: CNNs only; for each feature map, the tensor whose ReLU the network
    takes next (ResNet/VGG: the map before its ReLU; WRN: the next BatchNorm's output).
    ``embedding``: the penultimate representation fed to the classifier, (B, D).
    ``attention_probs``: transformers only; the model's own attention probabilities per
    layer (its ``output_attentions``), (B, heads, L, L), rows over keys summing to 1.
    ``queries`` / ``keys`` / ``values``: transformers only; each layer's query, key and
    value projections split into heads, (B, heads, L, head_dim) (MiniLM's value relations,
    MiniLMv2's q/k/v relations), where the model family declares them.
    ``mask``: which positions of ``logits`` count, shaped as ``logits`` without its last
    dimension (e.g. (B, L) for token logits (B, L, V)); ``None``: every position counts
    (per-example logits (B, C) need none). Losses that read logits reduce over the masked
    positions only (:func:`task_loss`, :mod:`kdbench.losses`).
    Fields a forward pass was not asked for are ``None``.
    """

    logits: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attention_scores: tuple[Tensor, ...] | None = None
    attention_mask: Tensor | None = None
    features: tuple[Tensor, ...] | None = None
    preact_features: tuple[Tensor, ...] | None = None
    embedding: Tensor | None = None
    attention_probs: tuple[Tensor, ...] | None = None
    queries: tuple[Tensor, ...] | None = None
    keys: tuple[Tensor, ...] | None = None
    values: tuple[Tensor, ...] | None = None
    mask: Tensor | None = None


class KDModel(nn.Module):
    """A model as kdbench sees it: ``forward(inputs, need)`` returns a :class:`ModelOutput`.

    ``inputs`` is the dict of tensors made by the model factory's encoder (plus ``labels``
    never: labels travel separately). ``need`` names the optional outputs to compute, so a
    plain forward stays cheap. Subclasses set ``capabilities`` (what they *can* expose) and
    ``family`` ("transformer" or "cnn"). Must work under ``torch.func.functional_call``.
    """

    capabilities: frozenset[str] = frozenset({LOGITS})
    family: str = "generic"
    #: names (as in ``named_parameters``) of parameters the model keeps fixed whoever trains
    #: it (a model option, e.g. frozen word embeddings); :func:`set_trainable` honours them
    frozen: frozenset[str] = frozenset()

    def describe(self) -> dict[str, Any]:
        """Shape facts a method may need to check compatibility (layers, width, ...)."""
        return {}

    def capture_points(self) -> dict[str, str]:
        """Where the model's internals are read, by name: the dotted module path (from this
        model) of each place its optional outputs come from (its layers, attention, feature
        stages), as ``kdbench inspect`` shows them. Default: none declared."""
        return {}

    def freeze(self, names: Iterable[str]) -> None:
        """Keep these parameters fixed: no gradient, so no optimizer touches them."""
        known = dict(self.named_parameters())
        unknown = sorted(set(names) - set(known))
        if unknown:
            raise KDBenchError(f"cannot freeze unknown parameters {unknown}")
        self.frozen = frozenset(self.frozen | set(names))
        for name in names:
            known[name].requires_grad_(False)


def set_trainable(model: nn.Module, trainable: bool) -> None:
    """Every parameter of ``model`` requires grad iff ``trainable`` and the model does not
    keep it frozen (:attr:`KDModel.frozen`): use it, not ``requires_grad_``, to switch a
    model between fixed and trained (a teacher that a method updates)."""
    frozen = getattr(model, "frozen", frozenset())
    for name, q in model.named_parameters():
        q.requires_grad_(trainable and name not in frozen)


Examples = dict[str, Any]
"""A split of raw examples: columns of equal length. Text tasks: ``text`` (list[str]),
optional ``text_pair`` (list[str]), ``label`` (np.ndarray). Image tasks: ``image``
(np.ndarray uint8 (N, C, H, W)) and ``label``."""

Encoded = dict[str, Tensor]
"""A split encoded for a model: tensors with the example index as first dimension."""


@dataclass(frozen=True)
class ModelFacts:
    """What a factory can say about a model from its options alone, without building it
    (a config file and a tokenizer read, no weights): what :meth:`ModelFactory.inspect`
    returns. It answers ``capabilities``, ``family`` and ``describe()`` as the built model
    would, so ``kdbench validate`` runs each method's :meth:`Method.check_models` on it and
    refuses an incompatible pair before anything is trained or written."""

    name: str  # the model as a reader knows it (factory and checkpoint), for messages
    family: str
    capabilities: frozenset[str]
    encoder_id: str
    facts: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        """The built model's :meth:`KDModel.describe` (layers, width, heads, ...)."""
        return dict(self.facts)


class ModelFactory(ABC):
    """Builds models of one family from validated options.

    ``Options`` is a pydantic model of the accepted options; ``modality`` says which tasks
    it can serve ("text" or "image").
    """

    name: ClassVar[str]
    description: ClassVar[str]
    modality: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    #: What the built models can expose (mirrors ``KDModel.capabilities``), so a suite
    #: pairing a method with a model that lacks what it needs fails at validation.
    capabilities: ClassVar[frozenset[str]] = frozenset({LOGITS})
    family: ClassVar[str] = "generic"

    @abstractmethod
    def build(self, options: Options, objective: Objective | Problem) -> KDModel:
        """A fresh model whose output layer is ``objective.num_outputs()`` wide (the run's
        :class:`Objective`; a bare :class:`Problem` answers the same for the built-in
        objectives); deterministic given torch's seed."""

    def encode(self, options: Options, examples: Examples, max_length: int | None) -> Encoded:
        """Turn raw examples into input tensors (tokenize text, scale images)."""
        raise NotImplementedError

    def encoder_id(self, options: Options) -> str:
        """A string that identifies the encoding (tokenizer), for caching encoded splits."""
        return self.name

    def encoder_fingerprint(self, options: Options) -> str:
        """A content hash of the files the encoding reads (e.g. a local tokenizer's
        vocabulary), so that changed files under the same name never reuse a cached
        encoding or cached teacher logits; '' (the default) when :meth:`encoder_id` says it
        all. Hugging Face tokenizers: :func:`kdbench.encoders.tokenizer_files_sha256`
        (the built-in ``bert``, ``hf`` and ``causal-lm`` factories return it)."""
        return ""

    def inspect(self, options: Options) -> ModelFacts | None:
        """The model's :class:`ModelFacts` read from its configuration, raising a
        :class:`KDBenchError` naming what is wrong (an unknown checkpoint folder, layers it
        does not have, a tokenizer that does not fit the model); called by ``kdbench
        validate``. Default None: nothing to check before building (the runner still
        checks the built models)."""
        return None

    def collate(self, encoded: Encoded, index: Tensor) -> dict[str, Tensor]:
        """Select a batch from an encoded split. Default: index every tensor."""
        return {k: v[index] for k, v in encoded.items()}


# --------------------------------------------------------------------------- tasks


class Task(ABC):
    """A data set with its fixed splits, its problem type and its official metrics.

    ``load`` returns at least ``train``, ``validation`` and ``test`` splits; extra
    evaluation splits (e.g. MNLI mismatched) may be added and are evaluated too.
    ``main_metric`` is what the leaderboard ranks by. ``version`` changes whenever the
    data or the metric changes, and is part of every run's hash.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    version: ClassVar[int] = 1
    modality: ClassVar[str]
    Options: ClassVar[type[Options]] = Options
    max_length: int | None = None
    #: How many labels the objective reads: classes for ``classification``, 1 for one
    #: value per example (the default); the objective sizes the model's head from it.
    num_labels: int = 1

    def __init__(self, options: Options):
        self.options = options

    @property
    @abstractmethod
    def main_metric(self) -> str: ...

    @property
    def objective(self) -> str:
        """The name of the registered :class:`Objective` that owns this task's loss, label
        layout, head width, evaluation and metric directions (``classification``,
        ``regression``, ``generation`` among the built-ins). A task declares it (a class
        attribute or a property) with :attr:`num_labels`. Compatibility: a task written
        before objectives that declares only :attr:`problem` gets ``problem.kind``."""
        if type(self).problem is not Task.problem:
            return self.problem.kind
        raise TypeError(f"task '{self.name}' declares no objective: set 'objective' (e.g. 'classification') and 'num_labels'")

    @property
    def problem(self) -> Problem:
        """The task's label layout as one record, derived from :attr:`objective` and
        :attr:`num_labels` (what objectives and hand-built methods read). Overriding it
        instead of declaring ``objective`` is the older way, still accepted."""
        return Problem(self.objective, self.num_labels)

    def metric_info(self, metric: str) -> MetricInfo | None:
        """Direction, scale and bounds of one of this task's metrics when the task knows
        better than its objective's defaults (e.g. a regression task reporting an error);
        None: the objective decides (:meth:`Objective.metric_info`)."""
        return None

    @abstractmethod
    def load(self, cache_dir: str) -> dict[str, Examples]:
        """The splits as raw examples. May download into ``cache_dir`` where online."""

    def local_labels(self) -> dict[str, np.ndarray] | None:
        """Each split's labels (by split or file name) when they can be read cheaply
        without the network (a local file, generated data), so ``kdbench validate`` checks
        them against the objective (:meth:`Objective.check_labels`) before anything runs;
        a malformed local file may raise :class:`DataError` here too. None (the default):
        the labels are checked when the data loads."""
        return None

    @abstractmethod
    def compute_metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Official metrics from predictions (class ids, or floats for regression)."""

    def augment(self, inputs: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
        """Training-time augmentation on a batch already on the device. Default: none."""
        return inputs

    @property
    def has_augmentation(self) -> bool:
        return type(self).augment is not Task.augment


# --------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class MetricInfo:
    """How to read one metric: ``higher_is_better`` (accuracy: True; MSE, perplexity:
    False), ``scale`` (the factor reports show it at: 100 for proportions and correlations,
    as KD papers do; 1 for errors and perplexities) and ``bounds`` (its range before
    scaling, ``None`` for an open end; intervals are clipped to it). Stored with every run,
    so reports never need the plugin that made it."""

    higher_is_better: bool = True
    scale: float = 1.0
    bounds: tuple[float | None, float | None] = (None, None)

    def to_dict(self) -> dict[str, Any]:
        """The form a run's metrics keep it in (``metrics["metric_info"][name]``)."""
        return {"higher_is_better": self.higher_is_better, "scale": self.scale, "bounds": list(self.bounds)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MetricInfo":
        lo, hi = (list(d.get("bounds") or (None, None)) + [None, None])[:2]
        return cls(bool(d.get("higher_is_better", True)), float(d.get("scale", 1.0)), (lo, hi))


class Evaluator(ABC):
    """One streaming evaluation of a split: :meth:`update` per batch (the model's output
    and the batch with its labels), then :meth:`finish` once. Keep what the metrics need
    (predicted ids, running sums), not the logits: a split of token logits does not fit
    in memory. Made by :meth:`Objective.start`. Before the first :meth:`update` the
    caller sets :attr:`model` to the model being evaluated (in eval mode), for evaluators
    that decode with it (generation objectives), and :attr:`teacher` where there is one;
    ``batch.inputs`` is that model's input."""

    #: The model being evaluated (set by the caller); None when the caller gives none.
    model: "KDModel | None" = None
    #: The run's teacher (set by the caller, in eval mode) when the model is a student
    #: whose teacher reads the same inputs (one encoding), for evaluators that compare the
    #: two (the generation objective's token KL); None otherwise.
    teacher: "KDModel | None" = None

    @abstractmethod
    def update(self, output: ModelOutput, batch: Batch) -> None:
        """Take one batch: ``output`` from the model in eval mode under inference mode
        (logits, plus the fields ``Objective.eval_needs`` names), ``batch.inputs`` on the
        device, ``batch.labels`` as the task stored them (their own dtype, on the CPU),
        ``batch.index`` the examples' positions in the split."""

    @abstractmethod
    def finish(self) -> dict[str, float]:
        """The split's metrics, by name (the task's ``main_metric`` among them)."""


@dataclass(frozen=True)
class Chance:
    """What a constant, label-blind predictor scores: ``predictions`` fed to the task's
    metrics in place of the model's, and ``rule`` naming how they were chosen (shown in
    the report's chance row)."""

    predictions: np.ndarray
    rule: str


class Objective(ABC):
    """What a task asks of a model: a registered plugin kind (hook ``kdbench_objectives``;
    a task names its objective in :attr:`Task.objective`). One instance serves one task.

    It owns:
      * the label layout: :meth:`labels` (a split's raw labels as the tensor the loss
        reads), :meth:`check_labels` (a named :class:`DataError` for labels that do not
        fit), :meth:`check_task` (refusals at ``kdbench validate``), :meth:`num_outputs`
        (the model head's width) and ``label_layout`` (``"class"``: one class id per
        example; ``"value"``: one float per example; an objective of its own, e.g.
        ``"token"``, for sequences);
      * the task loss :meth:`loss` and the soft (teacher) term of KD-style methods
        :meth:`soft_loss`, both reducing over ``mask`` (the positions that count);
      * evaluation: :meth:`start` gives a streaming :class:`Evaluator`;
      * each metric's :class:`MetricInfo` (:meth:`metric_info`), stored with every run;
      * the chance/baseline rule (:meth:`chance`) of the report's chance row;
      * ``shares_teacher_outputs``: whether a fixed teacher's logits over the training
        split may be computed once and shared by every run (False where they are too
        large to hold, e.g. a vocabulary per token);
      * :meth:`divergence`: how far two sets of predictions of one split are apart
        (a live teacher's drift from its start); :meth:`batch_divergence` streams it
        batch by batch where a split's outputs do not fit in memory.
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    label_layout: ClassVar[str] = "class"
    shares_teacher_outputs: ClassVar[bool] = True
    #: :class:`ModelOutput` fields (beyond logits) the evaluator reads, asked of the
    #: model's forward in evaluation (e.g. ``EMBEDDING`` for a retrieval objective)
    eval_needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, task: Task | None = None, problem: Problem | None = None):
        """For ``task`` (its ``problem`` and metrics); ``problem`` alone serves code that
        has no task (a method's unit test): metrics then need a task."""
        if task is None and problem is None:
            raise ValueError("an Objective needs a task or a problem")
        self.task = task
        self.problem: Problem = problem if problem is not None else task.problem  # type: ignore[union-attr]

    # -- label layout --------------------------------------------------------------------
    def num_outputs(self) -> int:
        """The width of the model's output layer (what a :class:`ModelFactory` sizes the
        head from). Default: ``problem.num_labels``."""
        return self.problem.num_labels

    @abstractmethod
    def labels(self, labels: np.ndarray) -> Tensor:
        """A split's labels as the tensor :meth:`loss` and the evaluator read."""

    def targets(self, batch: "Batch") -> Tensor:
        """What :meth:`loss` compares a model's output with on ``batch``. Default: the
        batch's labels (one per example); an objective whose targets are tokens of the
        input itself (language modelling) reads them from ``batch.inputs``."""
        return batch.labels

    def check_labels(self, split: str, labels: np.ndarray) -> None:
        """Raise :class:`DataError` naming the task, ``split`` and the offending values
        when labels do not fit this objective. Default: accept."""

    def check_task(self, task: Task) -> list[str]:
        """Why ``task`` cannot use this objective (checked at ``kdbench validate``, before
        any data is read), one line each; empty when it can."""
        return []

    # -- losses --------------------------------------------------------------------------
    @abstractmethod
    def loss(self, logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
        """The task loss of ``logits`` (..., C) against ``labels``, averaged over the
        positions ``mask`` keeps (all when None)."""

    @abstractmethod
    def soft_loss(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float, kind: str = "kl",
                  reduction: str = "batchmean", mask: Tensor | None = None) -> Tensor:
        """The soft (teacher) term of KD-style methods; ``kind`` and ``reduction`` as in
        :func:`kdbench.losses.soft_loss`."""

    # -- evaluation ----------------------------------------------------------------------
    @abstractmethod
    def start(self) -> Evaluator:
        """A fresh evaluator for one split."""

    @abstractmethod
    def predictions(self, logits: Tensor) -> np.ndarray:
        """What the task's metrics read for a batch of logits (class ids, values)."""

    def metrics(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """The task's metrics of ``predictions`` (floats)."""
        if self.task is None:
            raise ValueError(f"objective '{self.name}' was built without a task: it has no metrics")
        return {k: float(v) for k, v in self.task.compute_metrics(predictions, labels).items()}

    def metric_info(self, metric: str) -> MetricInfo:
        """Direction, scale and bounds of ``metric``: the task's own
        (:meth:`Task.metric_info`) when it has one, else this objective's default."""
        own = self.task.metric_info(metric) if self.task is not None else None
        return own if own is not None else self.default_metric_info(metric)

    def default_metric_info(self, metric: str) -> MetricInfo:
        """This objective's reading of ``metric``. Default: higher is better, x1, unbounded."""
        return MetricInfo()

    def chance(self, train_labels: np.ndarray, labels: np.ndarray) -> Chance | None:
        """The constant prediction of the report's chance row for a split with ``labels``
        (``train_labels``: the training split's); None: this objective has no chance row."""
        return None

    def divergence(self, start: Tensor, now: Tensor) -> tuple[float, str]:
        """(value, kind) of how far predictions ``now`` moved from ``start`` (a whole
        split's logits)."""
        raise NotImplementedError(f"objective '{self.name}' does not measure divergence")

    def batch_divergence(self, start: ModelOutput, now: ModelOutput) -> tuple[float, float, str]:
        """The streamed form of :meth:`divergence`, for objectives whose whole-split outputs
        are too large to hold (``shares_teacher_outputs`` False): one batch's ``(sum,
        weight, kind)`` from two models' outputs on the same inputs; the split's value is
        the sum of the sums over the sum of the weights (e.g. a KL summed over the counted
        token positions, and their number)."""
        raise NotImplementedError(f"objective '{self.name}' does not measure a streamed divergence")


class StreamingMetrics(Evaluator):
    """The evaluator of per-example objectives: keeps ``objective.predictions`` of each
    batch (one class id or value per example, not the logits) and the labels, and scores
    them with the task's metrics at :meth:`finish`."""

    def __init__(self, objective: Objective):
        self.objective = objective
        self.preds: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def update(self, output: ModelOutput, batch: Batch) -> None:
        self.preds.append(self.objective.predictions(output.logits.detach().float().cpu()))
        self.labels.append(batch.labels.detach().cpu().numpy())

    def finish(self) -> dict[str, float]:
        return self.objective.metrics(np.concatenate(self.preds), np.concatenate(self.labels))


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of ``values`` over the positions ``mask`` keeps (all when None); ``mask``
    has ``values``' shape or its leading dimensions (then broadcast over the rest)."""
    if mask is None:
        return values.mean()
    keep = mask.to(torch.bool)
    while keep.dim() < values.dim():
        keep = keep.unsqueeze(-1)
    keep = keep.expand_as(values)
    return values[keep].mean()


def flat_positions(logits: Tensor, mask: Tensor | None, *others: Tensor) -> tuple[Tensor, ...]:
    """``logits`` (..., C) as (N, C) over the positions ``mask`` (...,) keeps (all when
    None), and each of ``others`` (shaped as ``logits`` or as the mask) taken at the same
    positions: how a per-position loss is reduced over masked positions only. For
    per-example logits (B, C) without a mask this returns them unchanged."""
    if logits.dim() == 2 and mask is None:
        return (logits, *others)
    c = logits.shape[-1]
    if mask is None:
        return (logits.reshape(-1, c), *(o.reshape(-1, c) if o.dim() == logits.dim() else o.reshape(-1) for o in others))
    keep = mask.to(torch.bool)
    return (logits[keep], *(o[keep] for o in others))


# --------------------------------------------------------------------------- methods


STUDENT, TEACHER = "student", "teacher"
"""The two roles a model plays in a run (:meth:`Batch.inputs_for`)."""


@dataclass
class Batch:
    """A training or evaluation batch on the training device.

    ``inputs`` is the student's encoding of the batch's examples, ``teacher_inputs`` the
    teacher's encoding of the same examples in the same order. When the two models share
    an encoding (the same :meth:`ModelFactory.encoder_id`: one tokenizer) both names hold
    the *same* object, so a shared tokenizer costs nothing extra; leaving
    ``teacher_inputs`` out means exactly that. Read them through :meth:`inputs_for`."""

    inputs: dict[str, Tensor]
    labels: Tensor
    index: Tensor  # example indices within the split (keys the shared teacher outputs)
    teacher_inputs: dict[str, Tensor] = None  # type: ignore[assignment]  # None -> the student's (same object)

    def __post_init__(self) -> None:
        if self.teacher_inputs is None:
            self.teacher_inputs = self.inputs

    def inputs_for(self, role: str) -> dict[str, Tensor]:
        """The encoding of this batch for ``role`` (``"student"`` or ``"teacher"``)."""
        if role == STUDENT:
            return self.inputs
        if role == TEACHER:
            return self.teacher_inputs
        raise ValueError(f"unknown role {role!r} (allowed: {STUDENT!r}, {TEACHER!r})")

    @property
    def shares_inputs(self) -> bool:
        """True when teacher and student read one encoding (token positions line up)."""
        return self.teacher_inputs is self.inputs


@dataclass
class SetupInfo:
    """What a method may need to build its extra modules: ``sample`` is a training batch
    (for probing feature shapes with a forward pass), ``train_size`` the number of
    training examples (e.g. CRD's memory bank), ``device`` where training runs."""

    sample: Batch
    train_size: int
    device: torch.device


@dataclass
class RunStreams:
    """A run's random streams by name, each seeded from the run's seed (:func:`stream_seed`),
    independent of each other and of the global RNG. :meth:`generator` is the stream that
    everything drawing from it in the run shares (made on first use); :meth:`fresh` is a new
    generator at the stream's start (the data order read once for the setup sample, then
    again for training). The runner makes one per run; :class:`StepContext` draws from it."""

    seed: int
    generators: dict[str, torch.Generator] = field(default_factory=dict, repr=False)

    def generator(self, stream: str, device: torch.device | str | None = None) -> torch.Generator:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        key = f"{stream}@{dev}"
        if key not in self.generators:
            self.generators[key] = self.fresh(stream, dev)
        return self.generators[key]

    def fresh(self, stream: str, device: torch.device | str | None = None) -> torch.Generator:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return torch.Generator(device=dev).manual_seed(stream_seed(self.seed, stream))


@dataclass
class StepContext:
    """What a method's training step may use. Built once per run by the runner.

    ``teacher`` is ``None`` for methods that declare ``uses_teacher = False``. For methods
    with ``updates_teacher = True`` it is a fresh trainable copy owned by this run.
    ``teacher_forward(batch, need)`` gives the teacher's outputs without grad; it reads the
    shared cache when the method's needs allow, so prefer it to calling the teacher.
    ``next_quiz_batch()`` draws the next batch from the quiz split (cycling, seeded).
    ``student_optimizer``/``scheduler`` cover the student and ``extra`` modules.
    """

    student: KDModel
    teacher: KDModel | None
    extra: nn.Module | None
    student_optimizer: torch.optim.Optimizer
    scheduler: Any
    problem: Problem | Objective  # the run's objective; a bare Problem in hand-built contexts
    device: torch.device
    total_steps: int
    train_size: int
    teacher_forward: Callable[[Batch, frozenset[str]], ModelOutput]
    next_quiz_batch: Callable[[], Batch]
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    step: int = 0
    state: dict[str, Any] = field(default_factory=dict)  # method-owned state (teacher optimizer, ...)
    seed: int = 0  # the run's seed: every random stream of the run derives from it
    #: Builds a fresh teacher from the suite's teacher model spec *without* kdbench's task
    #: fine-tuning (its pretrained weights and a new head), on the device; None when the
    #: run has no teacher. For methods whose paper starts the teacher there (ProKT).
    build_teacher: Callable[[], KDModel] | None = None
    #: Examples in the quiz split (0: unknown or none), so a method can run one pass
    #: over it (MetaDistil's ``quiz_batches: all``) with ``next_quiz_batch``.
    quiz_size: int = 0
    #: One pass over the training split in example order, in batches of the given size
    #: (both roles' inputs), for a method that precomputes something per training example
    #: in :meth:`Method.setup`; None where the caller gives none.
    train_batches: Callable[[int], Iterator[Batch]] | None = None
    #: ``teacher_cache(name, compute)``: tensors computed once from the *fixed* teacher
    #: (``compute()``), e.g. its greedy responses or top-k log-probabilities over the
    #: training split; the runner keeps them beside the teacher's checkpoint with a
    #: checksum, shared by every method and seed, so ``name`` must say everything they
    #: depend on besides the teacher and the task. Default: computed now, not kept.
    teacher_cache: Callable[[str, Callable[[], dict[str, Tensor]]], dict[str, Tensor]] = lambda name, compute: compute()
    #: Seconds of named parts of the steps (``ctx.timed("generation")``), summed over the
    #: run; the runner stores them in the run's cost as ``<name>_s`` beside ``train_s``.
    timings: dict[str, float] = field(default_factory=dict)
    #: the run's random streams (:class:`RunStreams`); made from ``seed`` when not given
    streams: RunStreams | None = field(default=None, repr=False)
    #: counts the steps' teacher and student passes (:class:`kdbench.compute.PassCounter`;
    #: the runner's); what a method or helper adds by hand (decode steps) goes here. None
    #: in hand-built contexts.
    passes: Any = field(default=None, repr=False)

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Time a part of a training step (e.g. sampling responses, apart from the update)
        into ``timings[part]``; on a GPU the device is synchronised at both ends so the
        seconds are the part's own."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
            self.timings[part] = self.timings.get(part, 0.0) + time.perf_counter() - t0

    def generator(self, stream: str, device: torch.device | str | None = None) -> torch.Generator:
        """The run's seeded random stream named ``stream`` (created on first use, then
        shared), e.g. ``ctx.generator("crd-negatives")``. Streams are independent of each
        other and of the global RNG; see :func:`stream_seed`."""
        return self.run_streams.generator(stream, device)

    @property
    def run_streams(self) -> RunStreams:
        """The run's streams (made from ``seed`` on first use when the context was built
        without them, as tests do)."""
        if self.streams is None:
            self.streams = RunStreams(self.seed)
        return self.streams

    def student_step(self, loss: Tensor) -> None:
        """The one student update: zero the gradients, backpropagate ``loss``, step the
        student optimizer (gradient clipping, when the suite sets it, runs as the
        optimizer's pre-step hook) and the learning-rate schedule, then free the
        gradients: no parameter of the student or of ``extra`` has a ``.grad`` after it."""
        self.student_optimizer.zero_grad(set_to_none=True)  # whatever a method's own passes left before this step
        loss.backward()
        self.student_optimizer.step()
        # Freed now, not at the next step's zero_grad: otherwise a whole set of gradients
        # stays alive through the next step's forward passes and adds its size to the run's
        # peak memory (the MiniLM student's 47 MB word-embedding gradient among them).
        self.student_optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()

    @contextlib.contextmanager
    def rehearsal(self) -> Iterator[None]:
        """Run a loss without lasting side effects: on exit the run's random streams and the
        buffers of ``extra`` (e.g. CRD's memory banks) are as on entry, so the same loss on
        the same batch afterwards draws and reads the same (MetaDistil's pilot step)."""
        generators = self.run_streams.generators
        states = {k: g.get_state() for k, g in generators.items()}
        buffers = {n: b.clone() for n, b in self.extra.named_buffers()} if self.extra is not None else {}
        try:
            yield
        finally:
            for k in list(generators):
                if k in states:
                    generators[k].set_state(states[k])
                else:  # first drawn inside: the next use starts the stream afresh
                    del generators[k]
            for name, saved in buffers.items():  # swapped, not copied in place: the rehearsed graph may still read them
                owner, _, leaf = name.rpartition(".")
                self.extra.get_submodule(owner)._buffers[leaf] = saved  # type: ignore[union-attr]

    def student_params(self) -> list[nn.Parameter]:
        params = list(self.student.parameters())
        if self.extra is not None:
            params += list(self.extra.parameters())
        return params


#: Streams whose seeds predate :func:`stream_seed` (offsets from the run's seed); kept so
#: existing runs reproduce. "crd-negatives" is where CRD seeded itself before streams had
#: names (``torch.initial_seed() + 1_000_003``, the global seed being the run's seed).
_LEGACY_STREAMS = {"data": 0, "quiz": 1, "crd-negatives": 1_000_003}


def stream_seed(seed: int, stream: str) -> int:
    """Seed of the random stream ``stream`` of a run with seed ``seed``: ``seed`` itself for
    the data order, ``seed + 1`` for the quiz order and ``seed + 1_000_003`` for CRD's
    negatives (as before streams had names), and for any other name a 63-bit value
    derived from (seed, name) by SHA-256."""
    if stream in _LEGACY_STREAMS:
        return seed + _LEGACY_STREAMS[stream]  # CRD reduced mod 2**63 before: equal for every seed below 2**63 - 1_000_003
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 2**63


def full_precision(x: Tensor) -> Tensor:
    """Losses are computed in float32 under half-precision autocast; float64 stays float64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def task_loss(logits: Tensor, labels: Tensor, problem: Problem | Objective, mask: Tensor | None = None) -> Tensor:
    """The task loss: ``problem.loss`` when it is the run's :class:`Objective` (what the
    runner hands a method); for a bare :class:`Problem`, the core helpers the built-in
    objectives use: :func:`class_cross_entropy` for classification, :func:`value_mse` for
    regression. Reduced over the positions ``mask`` keeps."""
    if isinstance(problem, Objective):
        return problem.loss(logits, labels, mask)
    if problem.is_regression:
        return value_mse(logits, labels, mask)
    return class_cross_entropy(logits, labels, mask)


def batch_task_loss(output: ModelOutput, batch: Batch, problem: Problem | Objective) -> Tensor:
    """The task loss of a model's ``output`` on ``batch``: against what the objective
    compares it with (:meth:`Objective.targets`: the labels, or tokens of the inputs for a
    language model), over the positions ``output.mask`` keeps (all when None); a bare
    :class:`Problem` reads the labels. What a method calls where it needs "the task loss
    of this batch" without knowing the objective (MetaDistil's quiz loss)."""
    targets = problem.targets(batch) if isinstance(problem, Objective) else batch.labels
    return task_loss(output.logits, targets, problem, output.mask)


def class_cross_entropy(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cross-entropy of logits (..., C) against class ids (...), averaged over the
    positions ``mask`` keeps (all when None); in float32 under half-precision autocast."""
    flat, target = flat_positions(full_precision(logits), mask, labels)
    return nn.functional.cross_entropy(flat, target)


def value_mse(logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error of the single output (..., 1) against float targets (...),
    averaged over the positions ``mask`` keeps (all when None)."""
    logits = full_precision(logits)
    pred = logits.squeeze(-1)
    err = (pred - targets.to(pred.dtype)) ** 2
    if mask is None:
        return nn.functional.mse_loss(pred, targets.to(pred.dtype))
    return masked_mean(err, mask)


class Method(ABC):
    """A distillation method. Subclass, document the formula, set the class attributes.

    Loss-based methods implement :meth:`loss` only (it receives the :class:`Batch`); the
    default :meth:`train_step` runs teacher (no grad) -> student -> loss ->
    ``ctx.student_step``, and a strategy such as MetaDistil can wrap them. Methods that
    change the teacher (ProKT, MetaDistil) set ``updates_teacher = True``, override
    :meth:`train_step` and still update the student through ``ctx.student_step``.
    ``version`` is bumped when a default's meaning changes; the run hash changes through
    the params (a new field is dumped with its default; see :func:`added` for one that
    keeps the old behaviour).

    Class attributes:
      ``Params``: pydantic model of hyper-parameters with their defaults.
      ``uses_teacher``: False for methods that train on labels only.
      ``updates_teacher``: the run gets a fresh trainable copy of the teacher.
      ``student_needs`` / ``teacher_needs``: :class:`ModelOutput` fields the loss reads;
      models that cannot expose them are refused before training.
      ``uses_quiz``: the method draws quiz batches (the quiz split is carved out for every
      method anyway, so all methods see the same training data).
      ``augments_quiz``: the quiz batches get the task's training augmentation (where the
      task has one); an instance may set it from its params (MetaDistil's ``quiz_augment``).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    citation: ClassVar[str] = ""
    #: The loss on one line, as ``kdbench list methods --format md`` shows it (plain text,
    #: e.g. ``alpha*T^2*KL(p_t||p_s) + (1-alpha)*CE``); empty: the description is shown.
    formula: ClassVar[str] = ""
    #: Bumped when what a run of this method computes changes under the same params
    #: (a default's meaning, a loss's reduction); say in the docstring what changed.
    version: ClassVar[int] = 1
    Params: ClassVar[type[Options]] = Options
    uses_teacher: ClassVar[bool] = True
    updates_teacher: ClassVar[bool] = False
    student_needs: ClassVar[frozenset[str]] = frozenset({LOGITS})
    teacher_needs: ClassVar[frozenset[str]] = frozenset({LOGITS})
    uses_quiz: ClassVar[bool] = False
    #: Why the method needs teacher and student to see the *same token positions* (e.g.
    #: "it compares the [CLS] vectors at position 0 layer by layer"), or None for a method
    #: that reads per-example outputs only (logits, pooled embeddings) and so works across
    #: tokenizers. A suite pairing such a method with models of different encodings
    #: (:meth:`ModelFactory.encoder_id`) is refused at validation.
    aligned_positions: ClassVar[str | None] = None
    augments_quiz: bool = False

    def __init__(self, params: Options, problem: Problem | Objective):
        """``problem``: the task's :class:`Objective` (what the runner passes), or a bare
        :class:`Problem` (tests building a method by hand; the core helpers then stand in
        for the classification/regression objectives). Losses take ``self.problem`` as it
        is (:func:`task_loss`, :func:`kdbench.losses.soft_loss` accept either)."""
        self.params = params
        self.problem = problem

    @property
    def objective(self) -> Objective | None:
        """The run's objective (None when the method was built from a bare Problem)."""
        return self.problem if isinstance(self.problem, Objective) else None

    @property
    def label_layout(self) -> str:
        """``"class"``, ``"value"`` or an objective's own layout (see :class:`Objective`)."""
        return self.problem.label_layout

    # -- checks and set-up -------------------------------------------------------------
    def check_models(self, student: KDModel, teacher: KDModel | None) -> None:
        """Raise :class:`IncompatibleModelError` naming what a model lacks. Called at
        validation with :class:`ModelFacts` (read ``capabilities``, ``family`` and
        ``describe()`` only) and again on the built models before training."""
        for role, model, needs in (("student", student, self.student_needs), ("teacher", teacher, self.teacher_needs)):
            if model is None or (role == "teacher" and not self.uses_teacher):
                continue
            missing = sorted(set(needs) - set(model.capabilities))
            if missing:
                what = model.name if isinstance(model, ModelFacts) else type(model).__name__
                raise IncompatibleModelError(
                    f"method '{self.name}' needs the {role} to expose {missing}, but the "
                    f"{role} model ({what}, family '{model.family}') only exposes "
                    f"{sorted(model.capabilities)}"
                )

    def extra_modules(self, student: KDModel, teacher: KDModel | None, info: SetupInfo) -> nn.Module | None:
        """Trainable modules that belong to the student's side (projections, regressors).

        They are optimized with the student, counted in its parameters and cost, and
        reach :meth:`loss` as ``ctx.extra``. Called once, before :meth:`setup`."""
        return None

    def setup(self, ctx: StepContext) -> None:
        """Called once before the first step (e.g. to build a teacher optimizer)."""

    # -- the step -----------------------------------------------------------------------
    def loss(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, ctx: StepContext
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The student's training loss on ``batch`` and its named parts (tensors, read lazily).

        ``batch.labels`` are the targets; ``batch.index`` the examples' indices in the
        training split (e.g. CRD's memory bank rows). Random draws use
        ``ctx.generator(name)``. A loss must not step any optimizer: the caller does
        (the default :meth:`train_step`, or a strategy such as MetaDistil that also
        differentiates the loss with respect to the teacher)."""
        raise NotImplementedError(f"method '{self.name}' must implement loss() or train_step()")

    def train_step(self, ctx: StepContext, batch: Batch) -> dict[str, Tensor]:
        """One student optimizer step; returns named scalars, ``loss`` first."""
        teacher_out = ctx.teacher_forward(batch, self.teacher_needs) if self.uses_teacher else None  # reads batch.teacher_inputs
        with ctx.autocast():
            student_out = ctx.student(batch.inputs_for(STUDENT), need=self.student_needs)
            loss, parts = self.loss(student_out, teacher_out, batch, ctx)
        # The graph keeps what backward reads; the outputs the loss did not save (the teacher's
        # hidden states and attention scores, unused layers) are freed before backward.
        del teacher_out, student_out
        ctx.student_step(loss)
        return step_values(loss, parts)

    def planned_passes(self, steps: int, batch_size: int, quiz_size: int) -> dict[str, int] | None:
        """The passes a run of ``steps`` steps makes, by :func:`kdbench.compute.pass_key`
        (``student_fwd``, ``teacher_bwd``, ...; kinds left out are 0), for budgets given in
        FLOPs (``budget.flops``), which buy each method the steps its passes afford. The
        runner also counts the passes it makes; tests hold the two equal. Default: the
        default :meth:`train_step`'s (one student forward and backward per step, one
        teacher forward when the method uses a teacher); None for a method with its own
        :meth:`train_step` that does not override this (a FLOP budget then refuses it)."""
        if type(self).train_step is not Method.train_step:
            return None
        return {"student_fwd": steps, "student_bwd": steps, "teacher_fwd": steps if self.uses_teacher else 0}

    @classmethod
    def is_loss_based(cls) -> bool:
        """True for methods that only implement :meth:`loss` against a fixed teacher: the
        ones a teacher-updating strategy (MetaDistil) can wrap."""
        return cls.uses_teacher and not cls.updates_teacher and cls.train_step is Method.train_step

    @property
    def can_share_teacher_outputs(self) -> bool:
        """Fixed-teacher methods may read precomputed teacher outputs (logits only), where
        the objective allows it (:attr:`Objective.shares_teacher_outputs`)."""
        objective = self.objective
        if objective is not None and not objective.shares_teacher_outputs:
            return False
        return self.uses_teacher and not self.updates_teacher and set(self.teacher_needs) <= {LOGITS}


def check_alignment(method: Method | type[Method], teacher_encoding: str, student_encoding: str,
                    teacher_name: str = "", student_name: str = "") -> None:
    """Refuse a method that declares :attr:`Method.aligned_positions` on a teacher and a
    student that encode inputs differently (two tokenizers: position ``i`` is not the same
    token in both), naming the method, both encodings (and models) and why it needs them."""
    why = method.aligned_positions
    if why is not None and teacher_encoding != student_encoding:
        t = f"{teacher_encoding} (model {teacher_name})" if teacher_name else teacher_encoding
        s = f"{student_encoding} (model {student_name})" if student_name else student_encoding
        raise IncompatibleModelError(
            f"method '{method.name}' needs teacher and student to see the same token positions: {why}; but the teacher's "
            f"tokenizer is {t} and the student's {s}, so position i is not the same token in both. Use models that share "
            "a tokenizer, or a method that reads per-example outputs only (logits, pooled embeddings)")


def step_values(loss: Tensor, parts: dict[str, Tensor], **more: Tensor) -> dict[str, Tensor]:
    """What a training step returns: ``loss`` first, then its parts and ``more``, detached."""
    return {"loss": loss.detach(), **{k: v.detach() for k, v in {**parts, **more}.items()}}


def require_family(method: str, role: str, model: KDModel | None, family: str, why: str) -> None:
    """Refuse a model of another family, before training: ``why`` says what the method
    reads that only ``family`` models have (e.g. "convolutional feature maps (B, C, H, W)")."""
    if model is not None and model.family != family:
        raise IncompatibleModelError(
            f"method '{method}' needs {why} from a {family} model, but the {role} "
            f"model ({type(model).__name__}) is of family '{model.family}' and has none"
        )


def resolve_layer(method: str, role: str, index: int, num_layers: int) -> int:
    """``index`` (0-based, negative from the last) as a layer of a ``num_layers``-layer
    model, or :class:`IncompatibleModelError` naming the method, the role and the valid
    range: what a method that distils a chosen layer raises from ``check_models`` (at
    validate, where the factory can say the model's ``num_layers``)."""
    if not -num_layers <= index < num_layers:
        raise IncompatibleModelError(f"method '{method}' distils {role} layer {index}, but the {role} model has {num_layers} "
                                     f"layers (valid: 0..{num_layers - 1}, or -1..-{num_layers} counting from the last)")
    return index % num_layers


def iter_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless seeded epochs of shuffled index batches (the last partial batch is dropped
    when the split is larger than a batch, so every step sees ``batch_size`` examples)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        stop = n - n % batch_size if n >= batch_size else n
        for i in range(0, max(stop, 1), batch_size):
            yield perm[i : i + batch_size]
