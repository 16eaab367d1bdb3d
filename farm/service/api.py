"""The OpenAI files and fine-tuning jobs API, served by ``farm gateway`` for ``farm service``.

    POST   /v1/files                                  multipart: purpose=fine-tune, file (JSONL or Parquet)
    GET    /v1/files[?purpose&after&limit&order]      the caller's files
    GET    /v1/files/{id}
    DELETE /v1/files/{id}                             refused (409) while an active job reads it
    POST   /v1/fine_tuning/jobs                       farm.service.requests reads the body
    GET    /v1/fine_tuning/jobs[?after&limit&metadata[k]=v]
    GET    /v1/fine_tuning/jobs/{id}
    GET    /v1/fine_tuning/jobs/{id}/events[?after&limit]
    GET    /v1/fine_tuning/jobs/{id}/checkpoints[?after&limit]
    POST   /v1/fine_tuning/jobs/{id}/cancel

Same bearer tokens as the completions routes. A tenant's token sees and acts on that tenant's
files and jobs only; anyone else's id is answered exactly like a missing one (404). An admin
token lists everything and acts for a tenant named in the ``OpenAI-Organization`` header (what
``openai.OpenAI(organization=...)`` sends; ``farm sweep --service`` uses it). The API writes
only the catalog and the store: ``farm service`` picks new jobs up from the catalog, so the
gateway answers while the service restarts, and a job created meanwhile waits for it.
Quotas (``fine_tuning`` in the gateway file): active jobs, stored bytes, the size of one upload;
a refusal is a 429 naming the quota.
"""

from __future__ import annotations

import asyncio
import shutil
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from farm.data import DataError
from farm.registry.catalog import Principal
from farm.registry.names import NameError_, check_name
from farm.service.files import check_upload, spool_upload
from farm.service.records import ServiceRecords, file_object, job_object, new_id
from farm.service.requests import RequestError, read_request
# farm.serving.gateway imports this module only inside create_gateway_app: no import cycle.
from farm.serving.gateway import Gateway, GatewayError, _read_body

PURPOSE = "fine-tune"
MAX_FILENAME = 255
MULTIPART_OVERHEAD = 64 << 10  # the form's own bytes around the file


class FineTuningAPI:
    """Route handlers over the gateway's identity, the catalog's records and the registry's store."""

    def __init__(self, gateway: Gateway):
        from farm.registry.store import Store

        self.gateway = gateway
        self.config = gateway.config.fine_tuning
        self.records = ServiceRecords(gateway.catalog)
        self.store = Store(gateway.config.registry.store)

    # -- who is asking ------------------------------------------------------------------------
    async def _caller(self, request: Request, acting: bool = False) -> str | None:
        """The tenant the request acts for (None: an admin reading everything).

        ``acting``: the request creates or changes something, so an admin must name the tenant
        (``OpenAI-Organization``); a tenant's token may only name itself.
        """
        if self.config is None:
            raise GatewayError(404, "fine-tuning is not enabled on this gateway", "NotFoundError")
        # _limited looked the token up already (it runs first): one lookup per request
        who: Principal = getattr(request.state, "principal", None) or await self.gateway.principal(request)
        named = request.headers.get("openai-organization", "").strip() or None
        if named is not None:
            try:
                check_name("tenant", named)
            except NameError_ as exc:
                raise GatewayError(400, f"OpenAI-Organization: {exc}", param="OpenAI-Organization") from None
        if who.is_admin:
            if named is None and acting:
                raise GatewayError(400, "an admin token must name the tenant it acts for in the OpenAI-Organization "
                                        "header", param="OpenAI-Organization")
            return named
        if named is not None and named != who.tenant:
            raise GatewayError(403, f"this token belongs to tenant {who.tenant!r} and cannot act for {named!r}",
                               "permission_error", param="OpenAI-Organization")
        return who.tenant

    # -- files --------------------------------------------------------------------------------
    async def upload(self, request: Request) -> Response:
        tenant = await self._caller(request, acting=True)
        quota = self.config.quota(tenant)
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            raise GatewayError(411, "uploads need a Content-Length")
        if int(length) > quota.file_bytes + MULTIPART_OVERHEAD:
            raise GatewayError(413, f"file: over this tenant's limit of {quota.file_bytes:,} bytes per file", param="file")
        used = await asyncio.to_thread(self.records.stored_bytes, tenant)
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as exc:  # starlette's HTTPException (too many parts) or the parser's own error
            detail = getattr(exc, "detail", None) or str(exc)
            raise GatewayError(400, f"body: not a multipart form this API accepts ({detail})") from None
        try:
            purpose, upload = form.get("purpose"), form.get("file")
            if purpose != PURPOSE:
                raise GatewayError(400, f"purpose: must be {PURPOSE!r} (the farm keeps fine-tuning files only)",
                                   param="purpose")
            if upload is None or isinstance(upload, str):
                raise GatewayError(400, "file: required, as a multipart file part", param="file")
            filename = (upload.filename or "upload")[:MAX_FILENAME]
            spool = self.store.new_spool()
            try:
                def spool_it():
                    upload.file.seek(0)
                    return spool_upload(iter(lambda: upload.file.read(1 << 20), b""), spool, quota.file_bytes)

                try:
                    path, size, sha = await asyncio.to_thread(spool_it)
                except ValueError as exc:
                    raise GatewayError(413, str(exc), param="file") from None
                if used + size > quota.stored_bytes:
                    raise GatewayError(429, f"quota: storing {size:,} more bytes would put tenant {tenant!r} over its "
                                            f"{quota.stored_bytes:,} stored bytes ({used:,} used); delete files first",
                                       "quota_exceeded", param="file")
                try:
                    checked = await asyncio.to_thread(check_upload, path, size, sha, tenant, filename)
                except DataError as exc:
                    raise GatewayError(400, f"file: {exc}", "invalid_file", param="file") from None
                file_id = new_id("file")
                relative = await asyncio.to_thread(self.store.put_tenant_file, tenant, file_id, checked.suffix,
                                                   checked.path)
                # The catalog row last: a file is visible only once its bytes are whole in the store.
                body = await asyncio.to_thread(
                    lambda: self.records.add_file(file_id=file_id, tenant=tenant, filename=filename, purpose=PURPOSE,
                                                  size=size, sha256=sha, records=checked.records, fmt=checked.format,
                                                  store_path=relative))
            finally:
                shutil.rmtree(spool, ignore_errors=True)
        finally:
            await form.close()
        return JSONResponse(body)

    async def list_files(self, request: Request) -> Response:
        tenant = await self._caller(request)
        params = request.query_params
        purpose = params.get("purpose")
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise GatewayError(400, "order: 'asc' or 'desc'", param="order")
        page = await asyncio.to_thread(self.records.files, tenant, purpose, params.get("after"),
                                       _limit(params, 10000), order)
        return JSONResponse(page.to_json(with_ids=True))

    async def get_file(self, request: Request) -> Response:
        return JSONResponse(file_object(await self._file(request)))

    async def delete_file(self, request: Request) -> Response:
        row = await self._file(request, acting=True)
        job = await asyncio.to_thread(self.records.file_in_use, row.id)
        if job is not None:
            raise GatewayError(409, f"file {row.id} is used by job {job}, which has not finished; cancel it or wait",
                               "conflict", param="file_id")
        await asyncio.to_thread(self.records.delete_file, row.id)  # hidden first, then its bytes go
        await asyncio.to_thread(self.store.remove_tenant_file, row.store_path)
        return JSONResponse({"id": row.id, "object": "file", "deleted": True})

    async def _file(self, request: Request, acting: bool = False):
        tenant = await self._caller(request, acting=acting)
        file_id = request.path_params["file_id"]
        row = await asyncio.to_thread(self.records.file, tenant, file_id)
        if row is None:
            raise GatewayError(404, f"No such File object: {file_id[:60]}", "NotFoundError", param="file_id")
        return row

    # -- jobs ---------------------------------------------------------------------------------
    async def create_job(self, request: Request) -> Response:
        tenant = await self._caller(request, acting=True)
        body = await _read_body(request, self.gateway.config.max_body_bytes)
        try:
            job_request = read_request(body)
        except RequestError as exc:
            raise GatewayError(400, str(exc), param=exc.param) from None
        pool = self.gateway.pools.get(job_request.model)
        if job_request.model not in self.config.models or pool is None or not pool.config.allows(tenant):
            raise GatewayError(404, f"model: `{job_request.model[:200]}` is not a model you can fine-tune "
                                    f"(offered: {', '.join(self.config.models)})", "NotFoundError", param="model")
        for field in ("training_file", "validation_file"):
            file_id = getattr(job_request, field)
            if file_id is not None and await asyncio.to_thread(self.records.file, tenant, file_id) is None:
                raise GatewayError(400, f"{field}: no file {file_id[:60]!r} of yours (upload it with purpose "
                                        f"{PURPOSE!r} first)", "invalid_request_error", param=field)
        quota = self.config.quota(tenant)
        active = await asyncio.to_thread(self.records.active_jobs, tenant)
        if active >= quota.active_jobs:
            raise GatewayError(429, f"quota: tenant {tenant!r} has {active} jobs validating, queued or running, its "
                                    f"limit; wait for one to finish or cancel one", "quota_exceeded")
        job_id = new_id("ftjob")
        body = await asyncio.to_thread(
            lambda: self.records.create_job(job_id=job_id, tenant=tenant, model=job_request.model,
                                            base_model=pool.config.base_model,
                                            request=job_request.model_dump(exclude_none=True),
                                            training_file=job_request.training_file,
                                            validation_file=job_request.validation_file))
        return JSONResponse(body)

    async def list_jobs(self, request: Request) -> Response:
        tenant = await self._caller(request)
        params = request.query_params
        metadata = {key[len("metadata["):-1]: value for key, value in params.multi_items()
                    if key.startswith("metadata[") and key.endswith("]")}
        page = await asyncio.to_thread(self.records.jobs, tenant, params.get("after"), _limit(params, 20),
                                       metadata or None)
        return JSONResponse(page.to_json())

    async def get_job(self, request: Request) -> Response:
        return JSONResponse(job_object(await self._job(request)))

    async def events(self, request: Request) -> Response:
        row = await self._job(request)
        params = request.query_params
        page = await asyncio.to_thread(self.records.events, row.id, params.get("after"), _limit(params, 20))
        return JSONResponse(page.to_json())

    async def checkpoints(self, request: Request) -> Response:
        row = await self._job(request)
        params = request.query_params
        page = await asyncio.to_thread(self.records.checkpoints, row.id, params.get("after"), _limit(params, 10))
        return JSONResponse(page.to_json(with_ids=True))

    async def cancel(self, request: Request) -> Response:
        row = await self._job(request, acting=True)
        if row.status in ("succeeded", "failed", "cancelled"):
            raise GatewayError(409, f"job {row.id} has already {row.status}; only a job that has not finished can "
                                    "be cancelled", "conflict", param="fine_tuning_job_id")
        row = await asyncio.to_thread(self.records.request_cancel, row.id)
        return JSONResponse(job_object(row))

    async def _job(self, request: Request, acting: bool = False):
        tenant = await self._caller(request, acting=acting)
        job_id = request.path_params["job_id"]
        row = await asyncio.to_thread(self.records.job, tenant, job_id)
        if row is None:
            raise GatewayError(404, f"No such fine-tuning job: {job_id[:60]}", "NotFoundError",
                               param="fine_tuning_job_id")
        return row


def _limit(params, default: int) -> int:
    raw = params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 10000:
        raise GatewayError(400, "limit: a whole number from 1 to 10000", param="limit")
    return int(raw)


def _limited(gateway: Gateway, handler):
    """The caller's request limits (per minute, in flight) count these routes too, as the
    completions routes count; a refusal is the same 429 with ``Retry-After``."""
    async def endpoint(request: Request) -> Response:
        if gateway.config.fine_tuning is None:
            return await handler(request)  # answers 404 before anything counts
        who = request.state.principal = await gateway.principal(request)
        refusal = gateway.limiter.admit(who.tenant, 0)
        if refusal is not None:
            raise GatewayError(429, f"rate limit: {refusal.message}; retry after {refusal.retry_after_s} s",
                               "rate_limit_exceeded", headers={"Retry-After": str(refusal.retry_after_s)})
        try:
            return await handler(request)
        finally:
            gateway.limiter.release(who.tenant, 0, 0)

    return endpoint


def fine_tuning_routes(gateway: Gateway, handled) -> list[Route]:
    """The API's routes for the gateway's app; ``handled`` wraps each handler in its error
    answers, after the caller's request limits. Without ``fine_tuning`` in the gateway file
    every one answers 404."""
    api = FineTuningAPI(gateway)

    def wrap(handler):
        return handled(_limited(gateway, handler))

    return [
        Route("/v1/files", wrap(api.upload), methods=["POST"]),
        Route("/v1/files", wrap(api.list_files), methods=["GET"]),
        Route("/v1/files/{file_id}", wrap(api.get_file), methods=["GET"]),
        Route("/v1/files/{file_id}", wrap(api.delete_file), methods=["DELETE"]),
        Route("/v1/fine_tuning/jobs", wrap(api.create_job), methods=["POST"]),
        Route("/v1/fine_tuning/jobs", wrap(api.list_jobs), methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}", wrap(api.get_job), methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/events", wrap(api.events), methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/checkpoints", wrap(api.checkpoints), methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/cancel", wrap(api.cancel), methods=["POST"]),
    ]
