"""Generated protobuf and gRPC code for the schemas in proto/.

Do not edit: every file below this package is written by
`python tools/protogen.py` (`make proto`). Hand-written code lives in pilot/,
condor_plugin/ and submit/.
"""
