"""params.yaml -> typed, frozen configs; loud on typos.

`load_params(path, overrides)` reads the YAML, applies `-S key=value` overrides (the
syntax of `dvc exp run -S`: dotted key, YAML-typed value), and builds `Params`. An
unknown key, a missing key (one whose field has no default) or a value of the wrong
type raises `ParamsError` naming the dotted key. Stages read only their own section.

A config field that states a fact declared elsewhere is not a key: `DERIVED` fills it from the
key that declares it (the models' history length is `data.max_history`), and giving it is an error.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from grc_core.config import (GRPOConfig, LoopConfig, ModelConfig, RewardConfig, RQVAEConfig, SASRecConfig, SiblingConfig,
                             TrainConfig, ValueConfig, VEDConfig, VStarLoopConfig)
from tasks.env import PROJECT_ROOT


class ParamsError(ValueError):
    """A params.yaml key or a -S override is unknown, missing or of the wrong type."""


# Config fields filled from the one key that declares them.
DERIVED = {"backbone.model.max_history": "data.max_history", "sasrec.max_len": "data.max_history"}


# A DuckDB memory size; checked here because it is spliced into a SET statement.
_MEMORY_SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\Z")


@dataclass(frozen=True)
class DatasetSpec:
    """One source dataset. `parquet`: `<path>/interactions/**/*.parquet` (user_id, item_id,
    timestamp; possibly hive-partitioned) and an optional `<path>/items.parquet`, ingested by
    streaming through DuckDB; `prefix` then only names the dataset."""

    format: Literal["lcrec", "recbole", "parquet"]
    path: str
    prefix: str
    attributes: tuple[str, ...]
    index: str = ""
    fetch: str = ""
    hive_partitioning: bool = True  # parquet only: read `key=value` folder names as columns

    def __post_init__(self) -> None:
        if self.format == "parquet" and (self.index or self.fetch):
            raise ValueError("index and fetch are not supported with format parquet")

    def root(self) -> Path:
        return resolve_path(self.path)


@dataclass(frozen=True)
class DataConfig:
    dataset: str
    data_dir: str
    reports_dir: str
    max_history: int
    min_sequence_length: int
    drop_short_users: bool
    min_title_share: float
    exclude_history: bool
    ingest_memory_limit: str

    def __post_init__(self) -> None:
        if not _MEMORY_SIZE.match(self.ingest_memory_limit):
            raise ParamsError(f"data.ingest_memory_limit: expected a size such as 2GB or 512MiB, "
                              f"got {self.ingest_memory_limit!r}")
        if self.max_history < 1:
            raise ParamsError(f"data.max_history must be >= 1, got {self.max_history}")
        if self.min_sequence_length < 3:
            raise ParamsError(
                "data.min_sequence_length must be >= 3 (one history item, validation and test "
                f"targets), got {self.min_sequence_length}"
            )
        if not 0.0 <= self.min_title_share <= 1.0:
            raise ParamsError(f"data.min_title_share must be in [0, 1], got {self.min_title_share}")


@dataclass(frozen=True)
class EmbedConfig:
    model: str
    fields: tuple[Literal["title", "brand", "categories", "description"], ...]
    max_description_chars: int
    max_seq_length: int
    batch_size: int
    device: str


@dataclass(frozen=True)
class TokenizeConfig:
    source: Literal["auto", "train", "prebuilt"]
    method: Literal["rqvae", "rkmeans"]
    embedding: Literal["text", "cf", "text_cf"]
    cf_share: float
    dedup_last_level: bool
    rqvae: RQVAEConfig


@dataclass(frozen=True)
class BackboneConfig:
    model: ModelConfig
    train: TrainConfig
    valid_beam: int
    valid_users: int
    eval_batch_size: int
    cf_distill: float  # weight of SASRec's next-code distribution in each level's label (0: off)
    cf_distill_temperature: float  # its temperature
    cf_prior: float  # weight of SASRec's next-code log-distribution added to each level's logits (0: off)
    cf_teacher_folds: int  # 0: the sasrec stage's model scores the training instances; F >= 2: cross-fitted SASRecs
    dense_loss_weight: float  # with model.dense_head: weight of the dense head's item cross-entropy in the loss


@dataclass(frozen=True)
class MineConfig:
    beam: int
    top: int
    sampled: int
    max_instances: int
    valid_instances: int
    batch_size: int
    seed: int
    device: str
    crossfit_folds: int
    crossfit_epochs: int
    include_target: bool
    workers: int
    dask_address: str
    threads: int
    shard_batches: int

    def __post_init__(self) -> None:
        if self.workers < 1 or self.threads < 0 or self.shard_batches < 1:
            raise ParamsError(f"mine: need workers >= 1, threads >= 0, shard_batches >= 1, got "
                              f"{self.workers}, {self.threads}, {self.shard_batches}")
        if self.crossfit_folds == 1 or self.crossfit_folds < 0:
            raise ParamsError(f"mine.crossfit_folds: need 0 (off) or >= 2, got {self.crossfit_folds}")
        if self.crossfit_epochs < 0:
            raise ParamsError(f"mine.crossfit_epochs: need >= 0, got {self.crossfit_epochs}")
        if self.top < 0 or self.sampled < 0 or not 0 < self.top + self.sampled <= self.beam:
            raise ParamsError(f"mine: need 0 < top + sampled <= beam, got top={self.top} "
                              f"sampled={self.sampled} beam={self.beam}")


@dataclass(frozen=True)
class SFTConfig:
    variants: tuple[Literal["grc", "gc"], ...]
    lambda_rc: float
    draft_loss: Literal["target", "draft", "none"]
    train: TrainConfig
    valid_beam: int
    valid_users: int
    eval_batch_size: int


@dataclass(frozen=True)
class GRPOParams:
    rollout: GRPOConfig
    reward: RewardConfig
    loop: LoopConfig
    valid_beam: int
    valid_users: int
    eval_batch_size: int
    device: str
    threads: int


@dataclass(frozen=True)
class VStarParams:
    """The `vstar` stage: value model, VED, Sibling-GRPO, and the plain-GRPO control (tiger_rl)."""

    value: ValueConfig
    ved: VEDConfig  # candidate sets during RL
    ved_test: VEDConfig  # the method vstar_ved at test
    ved_value: Literal["learned", "cf", "sum"]  # vstar_ved's value: V_phi, SASRec's V_cf, or V_phi + ved_cf_weight V_cf
    ved_cf_weight: float
    rl: SiblingConfig
    loop: VStarLoopConfig
    control_beam: int  # tiger_rl: candidates per user from the policy's beam
    embedding: Literal["text", "sasrec"]  # item embeddings of the semantic step rewards
    valid_beam: int
    valid_users: int
    eval_batch_size: int
    device: str
    threads: int


# Every method evaluate can rank and candidates can dump (tasks/artifacts.py `load_ranker`).
Method = Literal["tiger", "tiger_cf", "sasrec", "sasrec_ens", "gc_sft", "grc_sft", "grc_rl", "tiger_rl", "vstar", "vstar_ved"]


@dataclass(frozen=True)
class EvaluateConfig:
    methods: tuple[Method, ...]
    beam: int
    batch_size: int
    bootstrap: int
    device: str
    alpha_e: float
    correct_width: int
    rank_rule: Literal["joint", "union", "marginal", "verify"]
    reflect_width: int
    users: int
    users_seed: int
    valid_users: int
    cf_weights: tuple[float, ...]  # tiger_cf: tried on validation, the best kept (tasks/artifacts.py `tiger_cf_weight`)
    grc_cf_weight: float
    grc_drafts: Literal["beam", "ved"]
    verify_gamma: float
    champion_default: Literal["", Method]  # tasks/evaluate.py `leaderboard`: kept unless beaten on validation
    champion_p: float

    def __post_init__(self) -> None:
        if not 0.0 < self.champion_p <= 1.0:
            raise ParamsError(f"evaluate.champion_p: need 0 < value <= 1, got {self.champion_p}")
        if not self.cf_weights or min(self.cf_weights) < 0 or len(set(self.cf_weights)) != len(self.cf_weights):
            raise ParamsError(f"evaluate.cf_weights: need one or more distinct weights >= 0, got {list(self.cf_weights)}")


@dataclass(frozen=True)
class CandidatesConfig:
    method: Literal["auto", Method]
    top_n: int
    beam: int
    users_per_shard: int
    users_file: str
    batch_size: int
    device: str
    workers: int
    dask_address: str
    threads: int
    promotion_tolerance: float  # tasks/publish.py: how far below the published model's recall@10 may still publish

    def __post_init__(self) -> None:
        if self.workers < 1 or self.threads < 0:
            raise ParamsError(f"candidates: need workers >= 1 and threads >= 0, got {self.workers}, {self.threads}")
        if not 0.0 <= self.promotion_tolerance <= 1.0:
            raise ParamsError(f"candidates.promotion_tolerance: need 0 <= value <= 1, got {self.promotion_tolerance}")
        if not 1 <= self.top_n <= self.beam:
            raise ParamsError(f"candidates: need 1 <= top_n <= beam, got top_n={self.top_n} beam={self.beam}")
        if self.users_per_shard < 1 or self.batch_size < 1:
            raise ParamsError(f"candidates: users_per_shard and batch_size must be >= 1, got "
                              f"{self.users_per_shard} and {self.batch_size}")


@dataclass(frozen=True)
class SASRecEnsembleConfig:
    seeds: tuple[int, ...]  # further SASRecs beside the sasrec stage's first ([]: none)
    weights: tuple[float, ...]  # w of their mean log-probability, tried on validation (tasks/sasrec.py)

    def __post_init__(self) -> None:
        if len(set(self.seeds)) != len(self.seeds):
            raise ParamsError(f"sasrec_ensemble.seeds: need distinct seeds, got {list(self.seeds)}")
        if not self.weights or min(self.weights) < 0 or len(set(self.weights)) != len(self.weights):
            raise ParamsError(f"sasrec_ensemble.weights: need one or more distinct weights >= 0, got {list(self.weights)}")


@dataclass(frozen=True)
class PipelineConfig:
    executor: Literal["inprocess", "deployments"]  # flows/pipeline.py: each stage in this process, or on its work pool


@dataclass(frozen=True)
class Params:
    data: DataConfig
    datasets: dict[str, DatasetSpec]
    embed: EmbedConfig
    tokenize: TokenizeConfig
    backbone: BackboneConfig
    sasrec: SASRecConfig
    sasrec_ensemble: SASRecEnsembleConfig
    mine: MineConfig
    sft: SFTConfig
    grpo: GRPOParams
    vstar: VStarParams
    evaluate: EvaluateConfig
    candidates: CandidatesConfig
    pipeline: PipelineConfig
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.data.dataset not in self.datasets:
            raise ParamsError(
                f"data.dataset: {self.data.dataset!r} is not a key of `datasets` "
                f"(known: {sorted(self.datasets)})"
            )
        if self.sasrec.seed in self.sasrec_ensemble.seeds:
            raise ParamsError(f"sasrec_ensemble.seeds: {list(self.sasrec_ensemble.seeds)} holds sasrec.seed "
                              f"{self.sasrec.seed}, the first model's: a member would be a copy of it")
        if self.candidates.method == "sasrec_ens" and not self.sasrec_ensemble.seeds:
            raise ParamsError("candidates.method is sasrec_ens, but sasrec_ensemble.seeds is empty: give the ensemble "
                              "a seed, or dump another method")

    def ranked_methods(self) -> tuple[str, ...]:
        """`evaluate.methods`, less sasrec_ens where there is no ensemble (sasrec_ensemble.seeds empty)."""
        return tuple(m for m in self.evaluate.methods if m != "sasrec_ens" or self.sasrec_ensemble.seeds)

    @property
    def dataset(self) -> DatasetSpec:
        return self.datasets[self.data.dataset]

    @property
    def id_source(self) -> Literal["train", "prebuilt"]:
        """Where semantic IDs come from: `auto` means prebuilt when the dataset has an index."""
        if self.tokenize.source == "auto":
            return "prebuilt" if self.dataset.index else "train"
        if self.tokenize.source == "prebuilt" and not self.dataset.index:
            raise ParamsError(f"tokenize.source: prebuilt, but datasets.{self.data.dataset}.index is empty")
        return self.tokenize.source

    @property
    def needs_text_embeddings(self) -> bool:
        """Whether a stage reads the embed stage's text vectors: IDs trained on text (`text`,
        `text_cf`) or V-STAR's step rewards (`vstar.embedding: text`). Prebuilt IDs come with no text."""
        return self.id_source == "train" and (self.tokenize.embedding != "cf" or self.vstar.embedding == "text")

    def dataset_dir(self) -> Path:
        return resolve_path(self.data.data_dir) / self.data.dataset

    def reports_dir(self) -> Path:
        return resolve_path(self.data.reports_dir) / self.data.dataset

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of the named top-level sections (for records and manifests)."""
        chosen = {s: self.raw[s] for s in sections} if sections else self.raw
        blob = json.dumps(chosen, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def resolve_path(path: str | Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (PROJECT_ROOT / p).resolve()


def parse_override(text: str) -> tuple[list[str], Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ParamsError(f"override {text!r} is not of the form key.path=value")
    try:
        return key.strip().split("."), yaml.safe_load(value) if value.strip() else ""
    except (yaml.YAMLError, RecursionError) as exc:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ParamsError(f"override {shown!r}: the value is not valid YAML ({_yaml_problem(exc)})") from None


def _yaml_problem(exc: BaseException) -> str:
    """A YAML error in one line (PyYAML's own spans several and quotes the source)."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    if isinstance(exc, yaml.reader.ReaderError):
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"character #x{char:04x} at offset {exc.position}: {exc.reason}"
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return (f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else "") + problem


def apply_override(raw: dict[str, Any], text: str) -> None:
    keys, value = parse_override(text)
    node = raw
    for i, k in enumerate(keys[:-1]):
        if not isinstance(node, dict) or k not in node:
            raise ParamsError(f"override {text!r}: unknown key {'.'.join(keys[: i + 1])!r}")
        node = node[k]
    if not isinstance(node, dict) or keys[-1] not in node:
        # New entries are allowed only inside free-form maps (e.g. a new dataset spec).
        if not (isinstance(node, dict) and len(keys) >= 2 and keys[0] == "datasets" and len(keys) == 2):
            raise ParamsError(f"override {text!r}: unknown key {'.'.join(keys)!r}")
    node[keys[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ParamsError(f"line {key_node.start_mark.line + 1}: key {key!r} given twice")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_params(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Params:
    path = Path(path) if path is not None else PROJECT_ROOT / "params.yaml"
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except IsADirectoryError:
        raise ParamsError(f"{path}: params file is a directory; -P takes a YAML file such as params.yaml") from None
    except UnicodeDecodeError as exc:
        raise ParamsError(f"{path}: not a UTF-8 YAML file (byte {exc.start} is {exc.object[exc.start]:#04x}); "
                          "-P takes a YAML file such as params.yaml") from None
    except OSError as exc:
        raise ParamsError(f"{path}: cannot read the params file ({exc.strerror})") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise ParamsError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping")
    for text in overrides:
        apply_override(raw, text)
    params = build(Params, with_derived(raw), "")
    return dataclasses.replace(params, raw=raw)


def with_derived(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with the `DERIVED` fields filled in; naming one in params.yaml is an error."""
    out = copy.deepcopy(raw)
    for key, source in DERIVED.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue  # the section itself is missing: build() names it
        if last in node:
            raise ParamsError(f"{key}: not a key; it is {source}")
        value: Any = out
        for part in source.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        node[last] = value
    return out


def build(tp: Any, value: Any, where: str) -> Any:
    """Build `tp` from plain YAML data, or raise ParamsError naming the dotted key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    label = where or "<root>"
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{label}: expected a mapping, got {type(value).__name__}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init and f.name != "raw"}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise ParamsError(f"{_join(where, unknown[0])}: unknown key (known: {sorted(fields)})")
        kwargs = {}
        for name, f in fields.items():
            if name in value:
                kwargs[name] = build(hints[name], value[name], _join(where, name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{_join(where, name)}: missing key")
        try:
            return tp(**kwargs)
        except ParamsError:
            raise
        except (TypeError, ValueError) as exc:
            raise ParamsError(f"{label}: {exc}") from None
    if origin is Literal:
        if value not in args:
            raise ParamsError(f"{label}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for a in args:
            try:
                return build(a, value, where)
            except ParamsError as exc:
                errors.append(str(exc))
        raise ParamsError(f"{label}: {value!r} matches none of {args}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{label}: expected a list, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(build(args[0], v, f"{label}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ParamsError(f"{label}: expected {len(args)} values, got {len(value)}")
        return tuple(build(a, v, f"{label}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{label}: expected a mapping, got {type(value).__name__}")
        return {str(k): build(args[1], v, _join(where, str(k))) for k, v in value.items()}
    if tp is type(None):
        if value is not None:
            raise ParamsError(f"{label}: expected null")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{label}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{label}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{label}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{label}: expected a string, got {value!r}")
        return value
    raise ParamsError(f"{label}: unsupported type {tp!r}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
