"""atheris harness of the ``http_body`` target (see atheris_common.py for usage)."""

from security_tests.fuzz.atheris_common import run

if __name__ == "__main__":
    run("http_body")
