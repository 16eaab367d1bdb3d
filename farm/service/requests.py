"""An OpenAI fine-tuning job request, as the farm reads it (``POST /v1/fine_tuning/jobs``).

The request's shape is OpenAI's (``openai`` 2.x, ``openai/types/fine_tuning/job_create_params.py``):
``model``, ``training_file``, ``validation_file``, ``hyperparameters`` (deprecated there in
favour of ``method``), ``method``, ``suffix``, ``seed``, ``metadata``, ``integrations``. What the
farm does with each:

* ``method.type`` is ``supervised`` (the service's default adapter method, LoRA) or one of the
  farm's PEFT methods (``lora``, ``dora``, ``ia3``, ``prefix``, ``prompt``, ``qlora``). Under the
  key of the same name go OpenAI's ``hyperparameters`` and, for a farm method, that method's own
  settings, checked by the same settings class a sweep spec uses::

      {"type": "lora", "lora": {"rank": 16, "target_modules": ["q_proj", "v_proj"],
                                "hyperparameters": {"n_epochs": 2, "batch_size": 8}}}

  ``dpo`` and ``reinforcement`` are refused: the farm trains supervised adapters.
* ``hyperparameters``: ``n_epochs`` becomes ``train.max_steps`` (epochs x training rows /
  batch, rounded up), ``batch_size`` the rows per step, ``learning_rate_multiplier`` scales the
  service's learning rate. ``auto`` keeps the service's choice (3 epochs, at most the service's
  ``max_steps``). The farm's one extension, ``max_steps``, asks for exact optimizer steps
  instead of epochs (what a sweep spec says; ``farm sweep --service`` sends it).
* ``suffix`` names the adapter in the registry (so the fine-tuned model is
  ``<tenant>.<suffix>.v<N>``); it must be a registry name.
* ``integrations`` are refused (a service reaches nothing outside its cluster); ``metadata``
  is kept within OpenAI's limits (16 keys, keys up to 64 characters, values up to 512).

Everything a tenant sends is hostile: unknown fields are refused by name, types are strict, and
every error is a ``RequestError`` whose message names the field (the API answers 400 with it).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from farm.methods import METHODS, method_info
from farm.spec import NAME_PATTERN, JobSettings

#: ``auto`` epochs: what the service trains when the request leaves it open
AUTO_EPOCHS = 3


class RequestError(ValueError):
    """A fine-tuning request the farm refuses; ``param`` names the field (OpenAI's error ``param``)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Hyperparameters(_Strict):
    """OpenAI's supervised hyperparameters; ``auto`` leaves the choice to the service."""

    batch_size: Union[Literal["auto"], int] = "auto"
    learning_rate_multiplier: Union[Literal["auto"], float, int] = "auto"
    n_epochs: Union[Literal["auto"], int] = "auto"
    #: the farm's extension (a sweep spec's train.max_steps): exact optimizer steps, instead of n_epochs
    max_steps: Optional[int] = Field(None, ge=1, le=1_000_000)

    @field_validator("batch_size", "n_epochs")
    @classmethod
    def _positive(cls, value):
        if value != "auto" and not 1 <= value <= 1024:
            raise ValueError("must be 'auto' or a whole number from 1 to 1024")
        return value

    @field_validator("learning_rate_multiplier")
    @classmethod
    def _multiplier(cls, value):
        if value != "auto" and not 0 < value <= 100:
            raise ValueError("must be 'auto' or a number above 0 and at most 100")
        return value


class FineTuningRequest(_Strict):
    """The body of ``POST /v1/fine_tuning/jobs``, checked; ``settings`` turns it into the farm's."""

    model: str = Field(min_length=1, max_length=500)
    training_file: str = Field(min_length=1, max_length=100)
    validation_file: Optional[str] = Field(None, min_length=1, max_length=100)
    hyperparameters: Optional[Hyperparameters] = None
    method: Optional[dict[str, Any]] = None
    suffix: Optional[str] = None
    seed: Optional[int] = Field(None, ge=0, le=2**31 - 1)
    metadata: Optional[dict[str, str]] = None
    integrations: Optional[list[Any]] = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value):
        if value is not None and (len(value) > 64 or not NAME_PATTERN.fullmatch(value)):
            raise ValueError("must be a registry name: up to 64 lower-case letters, digits, '-' or '_', "
                             "starting with a letter or digit")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value):
        if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("at most 16 keys, keys up to 64 characters, values up to 512")
        return value

    @field_validator("integrations")
    @classmethod
    def _no_integrations(cls, value):
        if value:
            raise ValueError("integrations are not offered: the service sends nothing outside its cluster")
        return value

    # -- what the farm trains ------------------------------------------------------------------
    def method_name(self) -> str:
        """The farm's PEFT method this request asks for (``supervised``: LoRA)."""
        kind = (self.method or {}).get("type", "supervised")
        return "lora" if kind == "supervised" else kind

    def _method_parts(self) -> tuple[dict, Hyperparameters]:
        """(the PEFT method's own settings, the hyperparameters), from ``method`` or the
        deprecated top-level ``hyperparameters``."""
        method = dict(self.method or {"type": "supervised"})
        kind = method.pop("type", None)
        if not isinstance(kind, str) or (kind != "supervised" and kind not in METHODS):
            offered = ", ".join(["supervised", *METHODS])
            raise RequestError("method.type", f"method.type must be one of {offered}, got {kind!r}"
                               + (" (the farm trains supervised adapters)" if kind in ("dpo", "reinforcement") else ""))
        extra = sorted(set(method) - {kind})
        if extra:
            raise RequestError(f"method.{extra[0]}", f"method.{extra[0]}: unknown field (method.type is {kind!r})")
        section = method.get(kind) or {}
        if not isinstance(section, dict):
            raise RequestError(f"method.{kind}", f"method.{kind} must be an object")
        section = dict(section)
        raw_hyper = section.pop("hyperparameters", None)
        if kind == "supervised" and section:
            field = sorted(section)[0]
            raise RequestError(f"method.supervised.{field}", f"method.supervised.{field}: unknown field "
                               "(adapter settings go under a PEFT method's type, for example method.type 'lora')")
        if raw_hyper is not None and self.hyperparameters is not None:
            raise RequestError("hyperparameters", f"hyperparameters given twice: in method.{kind} and at the top level")
        try:
            hyper = Hyperparameters.model_validate(raw_hyper) if raw_hyper is not None else \
                (self.hyperparameters or Hyperparameters())
        except ValidationError as exc:
            raise _request_error(exc, f"method.{kind}.hyperparameters") from None
        return section, hyper

    def method_settings(self, defaults: JobSettings | None = None):
        """The PEFT method's settings object: the request's own (checked by the same settings
        class a sweep spec uses; ``RequestError`` naming the field), else the defaults'."""
        section, _ = self._method_parts()
        name = self.method_name()
        info = method_info(name)
        try:
            if section:
                return info.settings.model_validate(section)
        except ValidationError as exc:
            raise _request_error(exc, f"method.{name}") from None
        return getattr(defaults, info.name) if defaults is not None and hasattr(defaults, info.name) \
            else info.settings()

    def settings(self, defaults: JobSettings, train_rows: int) -> JobSettings:
        """The farm's settings for this job: the service's ``defaults`` with this request's method,
        its settings and hyperparameters applied; ``train_rows`` is how many training rows the
        training file made (n_epochs is counted in them)."""
        _, hyper = self._method_parts()
        name = self.method_name()
        info = method_info(name)
        method_settings = self.method_settings(defaults)
        train = defaults.train
        batch = train.batch_size if hyper.batch_size == "auto" else hyper.batch_size
        batch = max(1, min(batch, train_rows))
        epochs = AUTO_EPOCHS if hyper.n_epochs == "auto" else hyper.n_epochs
        steps = max(1, math.ceil(epochs * train_rows / batch))
        if hyper.max_steps is not None:
            if hyper.n_epochs != "auto":
                raise RequestError("hyperparameters.max_steps", "hyperparameters: give n_epochs or max_steps, not both")
            steps = hyper.max_steps
        elif hyper.n_epochs == "auto":
            steps = min(steps, train.max_steps)
        rate = train.learning_rate * (1.0 if hyper.learning_rate_multiplier == "auto"
                                      else float(hyper.learning_rate_multiplier))
        updates: dict[str, Any] = {"max_steps": steps, "batch_size": batch, "learning_rate": rate}
        if self.seed is not None:
            updates["seed"] = self.seed
        raw = defaults.model_dump()
        raw.update({"method": name, info.name: method_settings.model_dump(), "train": {**raw["train"], **updates}})
        try:
            return JobSettings.model_validate(raw)
        except ValidationError as exc:
            raise _request_error(exc, "method") from None


def read_request(body: object) -> FineTuningRequest:
    """Check a request body; raises ``RequestError`` naming the first bad field."""
    if not isinstance(body, dict):
        raise RequestError(None, "the request body must be a JSON object")
    try:
        request = FineTuningRequest.model_validate(body)
    except ValidationError as exc:
        raise _request_error(exc, None) from None
    request.method_settings()  # the method object and its settings are checked now, not when the job starts
    return request


def _request_error(exc: ValidationError, prefix: str | None) -> RequestError:
    first = exc.errors()[0]
    path = ".".join(str(part) for part in first["loc"])
    param = f"{prefix}.{path}" if prefix and path else (prefix or path or None)
    message = "unknown field" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    return RequestError(param, f"{param}: {message}" if param else message)
