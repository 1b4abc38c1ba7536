"""atheris harness of the ``grpc_infer`` target (see atheris_common.py for usage)."""

from security_tests.fuzz.atheris_common import run

if __name__ == "__main__":
    run("grpc_infer")
