"""The HTTP API: an ASGI app (FastAPI on uvicorn) in front of the farm, and the dashboard.

app.py           `create_app`: the routes under /v1, OpenAPI from the job specs' own models
context.py       the one `Farm` the app serves, a tenant's view of it, reconnecting to `farm up`
auth.py          bearer tokens, scopes, tenants, the dashboard's session cookie
errors.py        one JSON error shape, the farm's own messages, 401/403/404/409/413/422/429/503
checks.py        what the API refuses beyond the SDK: only a tenant's own inputs, jobs, keys
views.py         a job's record as JSON; a tenant's own job or batch, else the same 404
jobs.py          /v1/jobs: submit one or many, list, read, cancel, outputs
events.py        /v1/jobs/{id}/events: server-sent events (state, progress, previews), resumable
inputs.py        /v1/inputs: an upload, content-addressed, through the one input resolver
batches.py       /v1/batches: rows in, status with failed jobs, retry, cancel
farm_routes.py   /v1/models, /v1/workers, /v1/tenant, /healthz, /readyz
webhooks.py      where webhooks may go (public addresses), how they are signed
sender.py        the webhook sender process: ended jobs → signed POSTs, at least once
dashboard.py     the dashboard's routes: page, login, JSON, live updates, files
dashboard_data.py  what the dashboard shows, per tenant
page.py          the dashboard's HTML: inline CSS and JS, nothing from elsewhere
server.py        `farm serve` / `farm dashboard`: uvicorn on a socket of our own

May import: `farm.batches`, `farm.client`, `farm.submit` and the wings below them, fastapi,
starlette, uvicorn, httpx (the sender). Nothing here imports torch; workers never import it.
"""
