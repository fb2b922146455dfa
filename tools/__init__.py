"""What is not the servers: the demo, the adaptive-sampling example,
chaos (kill -9 points), fuzzing, and the harness shared by tests, bench
and the demo. Nothing under server/ or siegetank/ imports from here."""
