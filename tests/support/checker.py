"""A checker in the manner of Jepsen's queue checker, over a versioned S3 bucket.

    lost        acknowledged submits without their outputs
    duplicated  keys under jobs/ (outputs, masks, meta.json) written more than once with
                differing content
    unexpected  outputs under jobs/ of a job nobody submitted

With versioning on, every write of a key is kept, so a duplicate execution that wrote
different bytes shows up as a second version with another ETag (a meta.json names its attempt,
so a second attempt's always differs).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from farm.storage.s3 import S3Store


def enable_versioning(store: S3Store) -> None:
    store.client.put_bucket_versioning(
        Bucket=store.bucket, VersioningConfiguration={"Status": "Enabled"}
    )


@dataclass
class Verdict:
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    writes: dict[str, int] = field(default_factory=dict)
    """Key → how many times it was written (versions)."""

    @property
    def clean(self) -> bool:
        return not (self.lost or self.duplicated or self.unexpected)


def check(store: S3Store, submitted: dict[str, int]) -> Verdict:
    """`submitted`: job id → number of output images it must have."""
    etags: dict[str, set[str]] = defaultdict(set)
    counts: dict[str, int] = defaultdict(int)
    paginator = store.client.get_paginator("list_object_versions")
    for page in paginator.paginate(Bucket=store.bucket, Prefix=f"{store.prefix}jobs/"):
        for v in page.get("Versions", []):
            key = v["Key"][len(store.prefix) :]
            etags[key].add(v["ETag"])
            counts[key] += 1
    verdict = Verdict(writes=dict(counts))
    for job_id, n in submitted.items():
        wanted = [f"jobs/{job_id}/out/{i}.png" for i in range(n)] + [f"jobs/{job_id}/meta.json"]
        if any(k not in etags for k in wanted):
            verdict.lost.append(job_id)
    verdict.duplicated = sorted(k for k, tags in etags.items() if len(tags) > 1)
    verdict.unexpected = sorted({k.split("/")[1] for k in etags} - set(submitted))
    return verdict
