# 1. An interactive shell, or a shell started by a network service (the usual shape of remote
# code execution). Entrypoint scripts and `sh -c` health checks started by the runtime are
# neither, so they raise nothing.
package palisade.rules.shell_in_container

import data.palisade.lib
import data.palisade.lib.exec_shells
import data.palisade.lib.parent
import data.palisade.lists

meta := {
	"id": "shell_in_container",
	"title": "Interactive or unexpected shell in a container",
	"severity": "medium",
	"mitre": ["T1059.004", "T1609"],
	"action": "alert",
	"events": ["exec"],
	# Only the shells' own execs (exec_shells is empty otherwise).
	"prefilter": {"exec": [
		{"exec.filename": {"basename_in": lists.shells}},
		{"exec.argv.0": {"basename_in": lists.shells}},
	]},
	"description": "A shell attached to a terminal (kubectl exec -it, docker exec -it) or spawned by a web server, database or other network service.",
}

shell if count(exec_shells) > 0

alerts contains {"message": msg} if {
	shell
	interactive
	msg := sprintf("interactive shell %s (%s) started in %s by %s", [
		input.exec.filename, concat(" ", input.exec.argv), where, parent_comm,
	])
}

alerts contains {"message": msg, "severity": "high"} if {
	shell
	not interactive
	some name in {parent.comm, lib.basename(parent.exe)}
	name in lists.shell_parent_services
	msg := sprintf("shell %s (%s) spawned by network service %s in %s", [
		input.exec.filename, concat(" ", input.exec.argv), name, where,
	])
}

# A terminal on stdin is what a person typing looks like.
interactive if input.process.stdio.stdin == "tty"

# `sh -i` asks for an interactive shell even without a terminal.
interactive if {
	some arg in array.slice(input.exec.argv, 1, count(input.exec.argv))
	startswith(arg, "-")
	contains(arg, "i")
	regex.match(`^-[a-zA-Z]*i[a-zA-Z]*$`, arg)
}

where := sprintf("pod %s/%s", [input.pod.namespace, input.pod.name]) if input.pod != null

else := "the host"

parent_comm := parent.comm

parent_comm := "?" if count(input.process.ancestors) == 0
