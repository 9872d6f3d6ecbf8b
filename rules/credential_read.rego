# 2. Reading credentials: password hashes, SSH private keys, the Kubernetes service account
# token. Detected on the open itself, so `python -c 'open("/etc/shadow")'` counts as much as cat.
package palisade.rules.credential_read

import data.palisade.lib
import data.palisade.lib.process_names
import data.palisade.lib.process_is_shell
import data.palisade.lib.open_path as path
import data.palisade.lists

meta := {
	"id": "credential_read",
	"title": "Credentials read",
	"severity": "high",
	"mitre": ["T1003.008", "T1552.001", "T1552.004", "T1528"],
	"action": "alert",
	"events": ["open"],
	# Only opens of these paths can raise (see rules/README.md, "Prefilters").
	"prefilter": {"open": [
		{"open.path": {"path_in": lists.credential_files}},
		{"open.path": {"path_contains": ["/.ssh/"]}},
		{"open.path": {"path_prefix": ["/etc/ssh/ssh_host_"]}},
		{"open.path": {"path_suffix": ["/serviceaccount/token"]}},
		# Fail closed: a path the kernel could not resolve is judged by its argument below
		# (which must at least end in a credential file's name).
		{"open.path_resolved": false, "open.path": {"path_suffix": credential_names}},
	]},
}

# The file names of the credential files ("shadow", ...), for the prefilter.
credential_names := [name | some file in lists.credential_files; name := lib.basename(file)]

reader := input.process.comm

alerts contains {"message": msg, "mitre": ["T1003.008"]} if {
	credential_file
	not authentication_program
	msg := sprintf("%s (pid %d) opened password hashes %s%s%s", [reader, input.process.pid, path, unresolved_note, lib.outcome(input.open.result)])
}

credential_file if path in lists.credential_files

# Fail closed. An open the kernel did not resolve (it failed, or the walk could not finish)
# names its file only by the argument, which a symlink, /proc/<pid>/root or a bind mount can
# disguise: it counts when the argument ends like a credential file ("/proc/1/root/etc/shadow"),
# or, for a bare relative name nothing resolved, has a credential file's name ("shadow").
credential_file if {
	input.open.path_resolved == false
	some file in lists.credential_files
	endswith(path, file)
}

credential_file if {
	input.open.path_resolved == false
	not startswith(input.open.path, "/")
	some file in lists.credential_files
	lib.basename(file) == lib.basename(input.open.path)
}

unresolved_note := "" if {
	not input.open.path_resolved == false
} else := sprintf(" (not resolved by the kernel; passed as %s)", [input.open.path_arg]) if {
	is_string(input.open.path_arg)
} else := " (not resolved by the kernel)"

alerts contains {"message": msg, "mitre": ["T1552.004"]} if {
	ssh_private_key
	not ssh_program
	msg := sprintf("%s (pid %d) opened SSH private key %s%s", [reader, input.process.pid, path, lib.outcome(input.open.result)])
}

# Applications read their own token through client libraries, so a token read only counts when
# it is done by a shell, by something a shell started, or by a tool (cat, base64, ...) -- i.e.
# by a person or a payload rather than the workload.
alerts contains {"message": msg, "mitre": ["T1528"]} if {
	service_account_token
	interactive_context
	msg := sprintf("%s (pid %d) read the service account token %s%s", [reader, input.process.pid, path, lib.outcome(input.open.result)])
}

authentication_program if {
	some name in process_names
	name in lists.credential_readers
}

ssh_program if {
	some name in process_names
	name in lists.ssh_key_readers
}

ssh_private_key if {
	contains(path, "/.ssh/")
	name := lib.basename(path)
	startswith(name, "id_")
	not endswith(name, ".pub")
}

ssh_private_key if {
	startswith(path, "/etc/ssh/ssh_host_")
	endswith(path, "_key")
}

service_account_token if {
	endswith(path, "/serviceaccount/token")
	contains(path, "/secrets/kubernetes.io/")
}

interactive_context if process_is_shell

interactive_context if {
	some ancestor in input.process.ancestors
	some name in {ancestor.comm, lib.basename(ancestor.exe)}
	name in lists.shells
}
