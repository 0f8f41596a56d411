"""Any language: Node's own `fetch` submits a job to a farm on S3 (moto), follows it, and
downloads its outputs from the presigned URLs the API hands out."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from farm.api.app import create_app
from farm.api.server import in_thread
from farm.client import Farm
from farm.local.up import LocalFarm
from farm.settings import settings_env
from farm.storage.s3 import S3Store
from tests.api.conftest import farm_settings, make_tokens

NODE_CLIENT = r"""
const [base, token, out] = process.argv.slice(2);
const auth = {Authorization: `Bearer ${token}`};
const fs = require("fs");
(async () => {
  let r = await fetch(base + "v1/jobs", {method: "POST", headers: {...auth, "Content-Type": "application/json"},
    body: JSON.stringify({kind: "txt2img", model: "tiny", prompt: "a fox from node", seed: 5,
                          num_inference_steps: 2, height: 32, width: 32})});
  if (r.status !== 201) throw new Error("submit: " + r.status + " " + await r.text());
  const {id} = await r.json();
  let rec;
  for (let i = 0; i < 600; i++) {
    rec = await (await fetch(base + "v1/jobs/" + id, {headers: auth})).json();
    if (["succeeded", "failed", "cancelled"].includes(rec.state)) break;
    await new Promise(ok => setTimeout(ok, 200));
  }
  if (rec.state !== "succeeded") throw new Error("job: " + JSON.stringify(rec));
  const {outputs} = await (await fetch(base + "v1/jobs/" + id + "/outputs", {headers: auth})).json();
  for (const o of outputs) {
    const got = await fetch(o.url);   // a presigned GET: no token needed
    if (!got.ok) throw new Error(o.url + ": " + got.status);
    fs.writeFileSync(out + "/" + o.name, Buffer.from(await got.arrayBuffer()));
  }
  console.log(JSON.stringify({id, names: outputs.map(o => o.name), urls: outputs.map(o => o.url)}));
})().catch(e => { console.error(String(e)); process.exit(1); });
"""


@pytest.fixture(scope="module")
def s3_api(redis_server, s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-s3")
    S3Store("api-node", endpoint_url=s3_server.endpoint_url, region="us-east-1").ensure_bucket()
    settings = farm_settings(
        redis_server,
        tmp,
        storage="s3://api-node/farm",
        s3_endpoint_url=s3_server.endpoint_url,
        s3_region="us-east-1",
    )
    with (
        LocalFarm(settings, workers=1, threads=1, preload=["tiny"]) as lf,
        Farm(lf.settings) as farm,
    ):
        tokens = make_tokens(farm)
        with in_thread(create_app(lf.settings)) as url:
            yield url, farm, tokens


def test_node_fetch_submits_follows_and_downloads_presigned_outputs(s3_api, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    url, farm, tokens = s3_api
    script = tmp_path / "client.js"
    script.write_text(NODE_CLIENT)
    run = subprocess.run(
        [node, str(script), url, tokens["acme"], str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=180,
        env=settings_env(farm.settings),
    )
    assert run.returncode == 0, run.stderr
    done = json.loads(run.stdout)
    assert done["names"] == ["0.png", "meta.json"]
    assert all("X-Amz-Signature=" in u or "Signature=" in u for u in done["urls"])
    farm.download(done["id"], tmp_path / "sdk")
    for name in done["names"]:
        assert (tmp_path / name).read_bytes() == (tmp_path / "sdk" / name).read_bytes()
