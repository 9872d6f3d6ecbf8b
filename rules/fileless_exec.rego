# 7. Fileless execution: the program runs from memory (memfd_create + execve of /dev/fd/N or
# /proc/self/fd/N, or execveat(fd, "", AT_EMPTY_PATH)), leaving nothing on disk to inspect.
package palisade.rules.fileless_exec

import data.palisade.lib

meta := {
	"id": "fileless_exec",
	"title": "Fileless execution from memory",
	"severity": "critical",
	"mitre": ["T1620", "T1027.011"],
	"action": "quarantine",
	"events": ["exec"],
	"prefilter": {"exec": [
		{"exec.fileless": true},
		{"process.exe": {"prefix": ["/memfd:"]}},
		{"exec.filename": {"prefix": ["/dev/fd/", "/proc/"]}},
		{"exec.via_execveat": true},
	]},
}

alerts contains {"message": msg} if {
	count(reasons) > 0
	msg := sprintf("fileless execution (%s): %s exe=%s", [concat("; ", reasons), concat(" ", input.exec.argv), input.process.exe])
}

reasons contains "the kernel reports a memory-backed executable" if input.exec.fileless

reasons contains "the executable is a memfd" if {
	is_string(input.process.exe)
	startswith(input.process.exe, "/memfd:")
}

reasons contains "exec through a file descriptor" if {
	strings.any_prefix_match(input.exec.filename, ["/dev/fd/", "/proc/"])
	regex.match(`^/(dev/fd|proc/(self|thread-self|[0-9]+)/fd)/[0-9]+$`, input.exec.filename)
}

# execveat with AT_EMPTY_PATH (0x1000) runs the file behind dirfd itself.
reasons contains "execveat of a file descriptor" if {
	input.exec.via_execveat
	input.exec.filename == ""
	bits.and(input.exec.at_flags, 4096) != 0
}
