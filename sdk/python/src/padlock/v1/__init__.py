"""The padlock wire contract (padlock.v1): `padlock_pb2` and
`padlock_pb2_grpc` are generated from proto/padlock/v1/padlock.proto when
the package is built (see setup.py)."""
