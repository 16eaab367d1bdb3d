"""Publish: a multipart upload of an adapter folder becomes the next version of tenant/adapter.

The body is read only after the token was checked; ``_Guard`` (in ``api.py``) counts it as it
arrives and answers 413 past ``max_upload_bytes``. Multipart parts are spooled to disk, file
names are checked to be plain names before anything is written, and ``Registry.publish``
validates and publishes the folder (422 with the reason when refused).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from farm.methods import METHODS
from farm.registry import validate
from farm.registry.core import VersionInfo
from farm.registry.names import NameError_, check_name
from farm.registry.routes.deps import PrincipalDep, RegistryDep, may_write, unprocessable
from farm.registry.routes.models import ERRORS, ErrorOut, PublishForm, check_json_value, name_param
from farm.registry.validate import PublishError

router = APIRouter(tags=["versions"], responses=ERRORS)

# The route reads the form itself (after auth), so the schema is declared here rather than
# derived from parameters.
_PUBLISH_SCHEMA = {"parameters": [{"name": "Idempotency-Key", "in": "header", "required": False, "schema": {
    "type": "string", "minLength": 8, "maxLength": 200},
    "description": "a retry with the key of a committed publish answers with that version"}],
    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files", "base_model"],
    "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": f"{validate.CONFIG_FILE}, {validate.WEIGHTS_FILE}, optionally README.md"},
        "base_model": {"type": "string", "description": "base model the adapter was trained on"},
        "base_architecture": {"type": "string", "description": "e.g. LlamaForCausalLM (for servability)"},
        "method": {"type": "string", "description": f"PEFT method the trainer used ({', '.join(METHODS)}); "
                                                    "default: what adapter_config.json shows"},
        "metrics": {"type": "string", "description": "JSON object, e.g. {\"eval_loss\": 1.2}"},
        "training": {"type": "string", "description": "JSON object"},
        "lineage": {"type": "string", "description": "JSON object (sweep_id, dataset_fingerprint, ...)"},
        "aliases": {"type": "string", "description": "comma-separated aliases to point here (default latest)"},
    }}}}}}


@router.post("/v1/adapters/{tenant}/{adapter}/versions", status_code=201, response_model=VersionInfo,
             openapi_extra=_PUBLISH_SCHEMA,
             responses={413: {"model": ErrorOut, "description": "upload over the size limit"}})
async def publish(request: Request, registry: RegistryDep, who: PrincipalDep, tenant: str = name_param("tenant"),
                  adapter: str = name_param("adapter")) -> dict:
    """Publish an adapter folder (multipart upload) as the next version of tenant/adapter."""
    check_name("tenant", tenant), check_name("adapter", adapter)
    may_write(who, tenant, f"{tenant}.{adapter}")
    max_upload_bytes = request.app.state.max_upload_bytes
    # The body is read only now, after the token was checked; the guard middleware counts it.
    form = await request.form(max_files=8, max_fields=16, max_part_size=1 << 20)
    folder = None
    try:
        uploads: dict[str, UploadFile] = {}
        fields: dict[str, str] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                name = value.filename or ""
                if name in uploads:
                    raise unprocessable(f"{name!r}: uploaded twice")
                uploads[name] = value
            elif key in fields:
                raise unprocessable(f"form field {key!r} given twice")
            else:
                fields[key] = value
        try:
            # names (plain names, no pickles, only adapter files) and sizes, before writing anything
            validate.validate_files({name: upload.size or 0 for name, upload in uploads.items()},
                                    max_upload_bytes)
            checked = PublishForm.parse(fields)
        except ValueError as exc:  # PublishError and NameError_ are ValueErrors too
            raise unprocessable(str(exc)) from None

        key = request.headers.get("idempotency-key")
        if key is not None and not 8 <= len(key) <= 200:
            raise unprocessable("Idempotency-Key: 8-200 characters")

        def save_and_publish():
            nonlocal folder
            folder = registry.store.new_spool()  # gc removes it if this server dies mid-request
            paths = {}
            for name, upload in uploads.items():
                if Path(name).name != name or name in ("", ".", ".."):  # validate_files already refused these
                    raise unprocessable(f"{name!r}: file names must be plain names")
                path = folder / name
                upload.file.seek(0)
                with path.open("xb") as out:
                    shutil.copyfileobj(upload.file, out, 1 << 20)
                paths[name] = path
            _check_config_bounds(paths[validate.CONFIG_FILE])
            return registry.publish(tenant, adapter, paths, **checked.model_dump(), max_file_bytes=max_upload_bytes,
                                    detect_architecture=False, idempotency_key=key)

        try:
            info = await run_in_threadpool(save_and_publish)
        except (PublishError, NameError_) as exc:
            raise unprocessable(str(exc)) from None
        except FileExistsError as exc:
            raise HTTPException(status_code=409, detail=str(exc)) from None
        return info.to_dict()
    finally:
        await form.close()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _check_config_bounds(path: Path) -> None:
    """Refuse numbers the catalog's integer columns cannot hold (``check_config`` checks the rest)."""
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise PublishError(f"{validate.CONFIG_FILE}: not valid JSON ({exc})") from None
    if isinstance(config, dict):
        rank = config.get("r")
        if isinstance(rank, int) and not isinstance(rank, bool) and not 1 <= rank <= 2**31 - 1:
            raise PublishError(f"{validate.CONFIG_FILE}: field 'r' out of range ({rank})")
        try:
            check_json_value(validate.CONFIG_FILE, config)
        except ValueError as exc:
            raise PublishError(str(exc)) from None
