"""ghostfast: fused kernels for GhostNet Ghost modules and DFC attention."""
