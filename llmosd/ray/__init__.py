"""Scale-out on Ray Serve (the ``ray`` extra): ``replica`` is the deployment (llmosd's runtime and
scheduler in each replica, behind Serve's HTTP proxy), ``deploy`` what ``llmosd ray deploy`` runs.
Nothing else in llmosd imports this package: Ray is never on the daemon's path."""
