"""Control: the config model, the app that builds and runs a worker, the plugin registry, the demo origin."""
