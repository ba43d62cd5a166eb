"""torus-sparse on Ray Serve (the extra `torus-sparse[ray]`): replicas of the server behind Ray's
router, `torus-sparse serve --ray`. Nothing outside this folder imports it.

- `deployment`: the deployment class (`TorusDeployment`), the bound application (`torus_app`), the
  builder for `serve run` / `serve deploy` config files (`app_builder`) and the CLI's `run`.
- `proxy`: a middleware for Ray's HTTP proxy that ends a stream whose replica died with a typed
  error (imports nothing of the server: the proxy process loads no torch).

The replica itself (the app, its id, health, live re-attach, drain) is `torus_adapters.server.replica`,
which imports no Ray.
"""
