"""What the API refuses beyond what the SDK refuses: a remote caller names only its own things.

A spec goes through the SDK's own checks first (`parse_spec`, then the submit pipeline's), so a
spec the SDK refuses is refused here with the same message. Then, because the caller is not on
the farm's machine and not the only tenant:

1. Inputs (`image`, `mask_image`, `ip_adapter_image`, a fine-tune's `images`) are store URIs
   of inputs this tenant uploaded (`POST /v1/inputs`): never a path on the API's machine, never
   another tenant's input or output. One message whether or not the object exists elsewhere.
2. LoRA refs are `job:<id>` of this tenant's fine-tunes (another's reads as no such job).
3. Model and IP-Adapter refs are built-ins, repo ids or refs relative to `FARM_MODELS_DIR`:
   no absolute or `~` paths on the workers' disks.
4. A webhook resolves to public addresses only (`farm.api.webhooks.check_url`).
5. The tenant's limit of images per job (413).
6. The idempotency `key` is the tenant's own: stored as `tenant:<t>/<key>`, so two tenants'
   keys never name one job.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from farm.api.errors import ApiError
from farm.errors import InvalidJob
from farm.inputs.resolver import is_uri
from farm.jobs.masks import MaskGenerator
from farm.jobs.specs import Finetune, parse_spec
from farm.state.tenants import Limits

KEY_PREFIX = "tenant:{tenant}/"
"""An API submit's idempotency key is stored under its tenant's prefix."""

_PATHS = ("/", "./", "../", "~")


def tenant_key(tenant: str, key: str | None) -> str | None:
    return None if key is None else KEY_PREFIX.format(tenant=tenant) + key


def shown_key(tenant: str | None, key: str | None) -> str | None:
    """The key as its tenant gave it."""
    prefix = KEY_PREFIX.format(tenant=tenant)
    return key[len(prefix) :] if key and tenant and key.startswith(prefix) else key


def input_fields(spec: Any) -> Iterable[tuple[str, Any]]:
    """(field, value) of every input a spec names."""
    if isinstance(spec, Finetune):
        if isinstance(spec.images, list):
            for i, v in enumerate(spec.images):
                yield f"images[{i}]", v
        else:
            yield "images", spec.images
        return
    for name in ("image", "mask_image", "ip_adapter_image"):
        value = getattr(spec, name, None)
        if value is not None and not isinstance(value, MaskGenerator):
            yield name, value


def refuse_input(field: str, value: Any) -> InvalidJob:
    name = field.split("[", 1)[0]
    return InvalidJob(
        f"{field}: no such input {value!r}: name an input this tenant uploaded (POST /v1/inputs)",
        field=name,
    )


class SpecChecks:
    """The API's own checks of specs for one tenant (see the module doc)."""

    def __init__(self, farm: Any, tenant: str, limits: Limits) -> None:
        self.farm = farm
        self.tenant = tenant
        self.limits = limits
        self._owned: dict[str, bool] = {}

    def parse(self, raw: Any) -> Any:
        """The spec `raw` names, checked as the SDK checks it and then by the API's rules."""
        if not isinstance(raw, dict):
            raise InvalidJob(
                f"spec: expected a JSON object, got {type(raw).__name__}", field="spec"
            )
        spec = parse_spec(raw)
        return self.check(spec)

    def check(self, spec: Any) -> Any:
        # 1. Inputs: this tenant's uploads only.
        wanted = list(input_fields(spec))
        for field, value in wanted:
            if not is_uri(value):
                raise InvalidJob(
                    f"{field}: over the API an input is the URI POST /v1/inputs returned, "
                    f"got {value!r}",
                    field=field.split("[", 1)[0],
                )
        self._own([v for _, v in wanted])
        for field, value in wanted:
            if not self._owned[value]:
                raise refuse_input(field, value)
        # 2. LoRA refs: this tenant's fine-tunes.
        for lora in getattr(spec, "loras", None) or []:
            if not lora.ref.startswith("job:"):
                raise InvalidJob(
                    f"loras: over the API a LoRA is job:<fine-tune id>, got {lora.ref!r}",
                    field="loras",
                )
            job_id = lora.ref.removeprefix("job:")
            (owner,) = self.farm.tracker.tenants.job_tenants([job_id])
            if owner != self.tenant:  # the SDK's own words for a job that is not there
                raise InvalidJob(
                    f"loras: {lora.ref}: no such job (never submitted, or its record expired)",
                    field="loras",
                )
        # 3. Refs on the workers' disks.
        for field in ("model", "ip_adapter"):
            ref = getattr(spec, field, None)
            if isinstance(ref, str) and ref.startswith(_PATHS):
                raise InvalidJob(
                    f"{field}: over the API a ref is a built-in, a repo id or a name under "
                    f"FARM_MODELS_DIR, got {ref!r}",
                    field=field,
                )
        # 4. Webhooks: public addresses only (again before every attempt).
        if spec.webhook:
            from farm.api.webhooks import check_url

            check_url(spec.webhook, self.farm.settings.webhook_allow_private)
        # 5. Images per job.
        n = getattr(spec, "num_images_per_prompt", 1)
        if self.limits.max_images and n > self.limits.max_images:
            raise ApiError(
                413,
                f"num_images_per_prompt: tenant {self.tenant!r} may ask for at most "
                f"{self.limits.max_images} images per job, got {n}",
                field="num_images_per_prompt",
            )
        # 6. The tenant's own idempotency keys.
        if spec.key is not None:
            spec = spec.model_copy(update={"key": tenant_key(self.tenant, spec.key)})
        return spec

    def _own(self, uris: list[str]) -> None:
        """Which of `uris` are inputs this tenant uploaded (remembered per request)."""
        todo = sorted({u for u in uris if u not in self._owned})
        if not todo:
            return
        store = self.farm.store
        keys = [store.key_of(u) for u in todo]
        known = [k for k in keys if k is not None]
        owned = dict(
            zip(known, self.farm.tracker.tenants.owns_inputs(self.tenant, known), strict=True)
        )
        for uri, key in zip(todo, keys, strict=True):
            self._owned[uri] = key is not None and owned.get(key, False)
