"""Wire fronts: each translates one transport to the transport-neutral service and back."""
