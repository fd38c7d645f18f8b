"""The data planes both ends share: UCX and the same-host files and mappings."""
