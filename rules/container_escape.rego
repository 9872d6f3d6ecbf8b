# 10. Container escape primitives: mounting, new user or mount namespaces, loading kernel
# modules, bpf(), and touching core_pattern, a cgroup release_agent or a container runtime
# socket. Attempts count even when they fail: a pod has no reason to try.
package palisade.rules.container_escape

import data.palisade.lib
import data.palisade.lib.exempt_pod
import data.palisade.lib.open_path
import data.palisade.lists

meta := {
	"id": "container_escape",
	"title": "Container escape primitive",
	"severity": "critical",
	"mitre": ["T1611", "T1610"],
	"action": "quarantine",
	"events": ["mount", "namespace", "module", "bpf", "open", "connect"],
	"prefilter": {
		"open": [
			{"open.write": true, "open.path": {"path_suffix": escape_files}},
			{"open.path": {"path_in": lists.runtime_sockets}},
		],
		"connect": [{"connect.family": "unix", "connect.unix_path": {"in": lists.runtime_sockets}}],
		"namespace": [
			{"namespace.flags": {"any_bits": 302120960}}, # the escape_namespaces bits
			{"namespace.op": "setns", "namespace.flags": 0},
		],
	},
}

who := sprintf("%s (pid %d)", [input.process.comm, input.process.pid])

alerts contains {"message": msg} if {
	some what in primitives
	not exempt_pod
	msg := sprintf("%s %s", [who, what])
}

# What the event does, from the rules for its own type only (most frequent types first): an
# event does not pay for the conditions of the other five.
primitives := open_primitives if input.type == "open"

else := connect_primitives if input.type == "connect"

else := mount_primitives if input.type == "mount"

else := namespace_primitives if input.type == "namespace"

else := module_primitives if input.type == "module"

else := bpf_primitives if input.type == "bpf"

mount_primitives contains sprintf("called %s(%s on %s, type %s)%s", [
	input.mount.op, input.mount.source, input.mount.target, input.mount.fstype, lib.outcome(input.mount.result),
]) if input.type == "mount"

# CLONE_NEWNS 0x20000, CLONE_NEWUSER 0x10000000, CLONE_NEWCGROUP 0x2000000.
escape_namespaces := {"CLONE_NEWNS": 131072, "CLONE_NEWUSER": 268435456, "CLONE_NEWCGROUP": 33554432}

namespace_primitives contains sprintf("called %s(%s)%s", [input.namespace.op, name, lib.outcome(input.namespace.result)]) if {
	input.type == "namespace"
	some name, bit in escape_namespaces
	bits.and(input.namespace.flags, bit) != 0
}

# setns into another process's namespaces (flags 0 = any type) is how nsenter works.
namespace_primitives contains sprintf("entered another namespace with setns(fd %d)%s", [input.namespace.fd, lib.outcome(input.namespace.result)]) if {
	input.type == "namespace"
	input.namespace.op == "setns"
	input.namespace.flags == 0
}

module_primitives contains sprintf("loaded a kernel module with %s%s%s", [input.module.op, module_name, lib.outcome(input.module.result)]) if {
	input.type == "module"
	input.module.op != "delete_module"
}

module_primitives contains sprintf("unloaded kernel module %s%s", [input.module.name, lib.outcome(input.module.result)]) if {
	input.type == "module"
	input.module.op == "delete_module"
}

module_name := sprintf(" (%s)", [input.module.name]) if input.module.name != ""

else := ""

bpf_primitives contains sprintf("called bpf(%s)%s", [object.get(input.bpf, "cmd_name", sprintf("%d", [input.bpf.cmd])), lib.outcome(input.bpf.result)]) if {
	input.type == "bpf"
}

open_primitives contains sprintf("opened %s for writing%s", [path, lib.outcome(input.open.result)]) if {
	input.type == "open"
	input.open.write
	path := open_path
	escape_file(path)
}

open_primitives contains sprintf("opened container runtime socket %s%s", [path, lib.outcome(input.open.result)]) if {
	input.type == "open"
	path := open_path
	path in lists.runtime_sockets
}

connect_primitives contains sprintf("connected to container runtime socket %s%s", [input.connect.unix_path, lib.outcome(input.connect.result)]) if {
	input.type == "connect"
	input.connect.family == "unix"
	input.connect.unix_path in lists.runtime_sockets
}

escape_file(path) if strings.any_suffix_match(path, escape_files)

escape_files := [
	"/sys/kernel/core_pattern",
	"/release_agent",
	"/notify_on_release",
	"/sys/kernel/modprobe",
	"/sys/fs/binfmt_misc/register",
]
