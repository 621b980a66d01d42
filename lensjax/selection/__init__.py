"""Model selection from fine-tuning loss curves: laws, batched fits, selectors, metrics, cost."""
