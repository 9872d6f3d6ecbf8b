# 11. Reverse shell: a shell or interpreter whose standard streams are a network socket, either
# seen at exec or as the dup2/dup3 that wires a socket onto fd 0, 1 or 2.
package palisade.rules.reverse_shell

import data.palisade.lib.exec_shells
import data.palisade.lib.exec_interpreters
import data.palisade.lib.process_names
import data.palisade.lib.parent
import data.palisade.lists

meta := {
	"id": "reverse_shell",
	"title": "Reverse shell",
	"severity": "critical",
	"mitre": ["T1059.004", "T1071"],
	"action": "quarantine",
	"events": ["exec", "dup"],
	"prefilter": {
		"exec": [{"process.stdio.stdin": "socket"}, {"process.stdio.stdout": "socket"}],
		"dup": [{"dup.new_fd": {"in": [0, 1, 2]}, "dup.new_fd_kind": "socket"}],
	},
}

stdio := input.process.stdio

socket_streams contains name if {
	some name in ["stdin", "stdout", "stderr"]
	stdio[name] == "socket"
}

# Checked first: it rules out nearly every exec for the price of a field comparison or two.
stdin_or_stdout_socket if stdio.stdin == "socket"

stdin_or_stdout_socket if stdio.stdout == "socket"

shell_like if count(exec_shells) > 0

shell_like if count(exec_interpreters) > 0

alerts contains {"message": msg} if {
	input.type == "exec"
	stdin_or_stdout_socket
	shell_like
	not super_server_child
	msg := sprintf("%s started with %s on a network socket: %s", [
		input.exec.filename, concat(" and ", sort_streams), concat(" ", input.exec.argv),
	])
}

# A renamed shell shows by its behaviour: every standard stream is the same network socket.
alerts contains {"message": msg} if {
	input.type == "exec"
	stdin_or_stdout_socket
	count(socket_streams) == 3
	not shell_like
	not super_server_child
	msg := sprintf("%s started with all standard streams on a network socket: %s", [
		input.exec.filename, concat(" ", input.exec.argv),
	])
}

alerts contains {"message": msg} if {
	input.type == "dup"
	input.dup.new_fd in {0, 1, 2}
	input.dup.new_fd_kind == "socket"
	input.dup.result >= 0
	not super_server_process
	msg := sprintf("%s (pid %d) redirected fd %d to a network socket with %s", [
		input.process.comm, input.process.pid, input.dup.new_fd, input.dup.op,
	])
}

sort_streams := sort([s | some s in socket_streams])

# inetd-style super-servers legitimately run services with a socket as stdio.
super_server_child if {
	parent.comm in lists.socket_stdio_services
}

super_server_process if {
	some name in process_names
	name in lists.socket_stdio_services
}
