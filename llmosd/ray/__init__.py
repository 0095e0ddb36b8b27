"""Scale-out on Ray Serve (the ``ray`` extra): ``replica`` is the model deployment (llmosd's runtime and
scheduler in each replica), ``ingress`` the deployment on Serve's HTTP proxy that sends each request to a
replica (and again, when that replica dies before answering), ``app`` the two bound together, ``deploy``
what ``llmosd ray deploy`` runs.
Nothing else in llmosd imports this package: Ray is never on the daemon's path."""
