"""The KServe V2 HTTP/REST front: routes, body reading, the JSON and binary tensor codec."""
