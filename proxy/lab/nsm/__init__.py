"""The lab's NSM stand-in: registry, manager and kernel forwarder in one process (like nsmgr)."""
