# Default policy for portcullis: deny every request except health probes.
#
# It keeps a new deployment closed until an operator installs a real policy, while
# GET or HEAD on exactly /healthz, /readyz or /livez still passes, so that kubelet probes
# routed through Envoy do not keep the pod from becoming ready. The decision is a plain
# boolean: Envoy answers a deny with 403 and an empty body.
package envoy.authz

health_paths := {"healthz", "readyz", "livez"}

default allow := false

allow if {
	input.attributes.request.http.method in {"GET", "HEAD"}
	count(input.parsed_path) == 1
	input.parsed_path[0] in health_paths
}
