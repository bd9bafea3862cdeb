"""The HL7 v2 wire layer: MLLP framing, MSH reading, triage, ACKs, parsing.

Everything here is sans-I/O: bytes and values in, bytes and values out.
"""
