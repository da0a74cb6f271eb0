"""Runs on Kubernetes: `splitfed launch SCENARIO` (helm upgrade --install, then follow the pods),
`splitfed status`, `splitfed logs` and `splitfed delete`.

`values` (run options -> chart values) is pure; `helm` runs the helm binary; `kube` connects the
`kubernetes` client and makes the requests the commands need (the client is the `cluster` extra,
imported only in this package and only when a command runs, so `splitfed run` and the images
never need it); `watch` turns pods, events and logs into progress, failures and the lead role's
result; `commands` are the typer commands cli.py registers, built on splitfed.commandline."""
