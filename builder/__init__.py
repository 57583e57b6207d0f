"""Image build time: download pinned model weights into the image and verify them (docs/DEPLOY.md)."""
