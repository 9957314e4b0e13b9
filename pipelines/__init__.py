"""Self-contained diffusers pipelines shipped by fd-onestep (installed as ``fd_onestep.pipelines``)."""
