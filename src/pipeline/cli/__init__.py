"""Every way in: the `pipeline` command (`main`), its Hydra apps (`apps`), the DVC stage
runner (`stages`), and the one place where errors and signals become exit statuses (`exits`)."""
