"""`farm dashboard`: a read-only web page over the farm.

server.py  the HTTP server (standard library), its routes and security headers
data.py    what the page shows, as JSON-ready dicts
page.py    the one HTML page: inline CSS and JS, nothing from elsewhere

May import: `farm.batches`, `farm.client` and the wings below them.
"""
