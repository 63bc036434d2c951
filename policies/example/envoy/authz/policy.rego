# Example policy for portcullis, written as for the OPA Envoy plugin: it reads the plugin's
# input document and returns the plugin's object decision, so it runs unchanged in both.
#
# Rules, first match wins:
#   - a path with a `.` or `..` segment (plain or percent-encoded) is denied with 400;
#   - GET and HEAD under /public/ are allowed for anyone;
#   - /admin/ is allowed with header `x-role: admin`, else denied with 403;
#   - POST /api/orders is allowed when `quantity` in the JSON body is a whole number
#     from 1 to 100, else denied with 400;
#   - everything else is denied with 403.
package envoy.authz

http_request := input.attributes.request.http

# Envoy sends header names in lower case.
request_headers := object.get(http_request, "headers", {})

# The first matching rule's outcome: whether the request passes, the status of a deny,
# and a reason for the client and the audit log.
default outcome := {"allowed": false, "status": 403, "reason": "no rule allows this request"}

outcome := {"allowed": false, "status": 400, "reason": "path must not contain . or .. segments"} if {
	dot_segment
} else := {"allowed": true, "reason": "public resource"} if {
	http_request.method in data.envoy.authz.public_methods
	input.parsed_path[0] == "public"
} else := {"allowed": true, "reason": "admin role"} if {
	input.parsed_path[0] == "admin"
	request_headers["x-role"] in data.envoy.authz.admin_roles
} else := {"allowed": false, "status": 403, "reason": "admin role required"} if {
	input.parsed_path[0] == "admin"
} else := {"allowed": true, "reason": "order accepted"} if {
	order_create
	valid_quantity(input.parsed_body.quantity)
} else := {"allowed": false, "status": 400, "reason": "quantity must be a whole number from 1 to 100"} if {
	order_create
}

# Envoy forwards the path as the client sent it. An upstream that resolves
# `/public/../admin` to `/admin` would otherwise serve an admin page under the public rule.
dot_segment if {
	some segment in input.parsed_path
	urlquery.decode(segment) in {".", ".."}
}

order_create if {
	http_request.method == "POST"
	input.parsed_path == ["api", "orders"]
}

valid_quantity(quantity) if {
	is_number(quantity)
	floor(quantity) == quantity
	quantity >= data.envoy.authz.order_quantity.min
	quantity <= data.envoy.authz.order_quantity.max
}

# The decision Envoy acts on. On allow, `headers` are added to the request sent upstream
# and `response_headers_to_add` to the response sent back; on deny, Envoy answers with
# `http_status`, `headers` and `body` itself.
allow := {
	"allowed": true,
	"headers": {"x-portcullis-policy": "example"},
	"request_headers_to_remove": ["x-internal-debug"],
	"response_headers_to_add": {"x-portcullis-decision": "allowed"},
	"dynamic_metadata": {"policy": "example", "reason": outcome.reason},
} if {
	outcome.allowed
}

allow := {
	"allowed": false,
	"http_status": outcome.status,
	"headers": {"content-type": "application/json", "x-portcullis-policy": "example"},
	"body": json.marshal({"reason": outcome.reason}),
	"dynamic_metadata": {"policy": "example", "reason": outcome.reason},
} if {
	not outcome.allowed
}
