"""The orchestrator: turns a signed ``deploy.rollout`` into per-host ``deploy.request``s."""
