"""ML attacks through a real gateway process: the attack world's fixtures."""

from security_tests.ml.world.fixtures import attack_gw, attack_world

__all__ = ["attack_gw", "attack_world"]
