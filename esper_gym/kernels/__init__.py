"""Blueprints to kernels: templates, generator, torch.export compiler, store and cache."""
