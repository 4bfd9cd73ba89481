// nsminterop: Go peers for the NSM token and mutual-TLS interop check (../check.py).
//
// check.py builds this in GOPATH mode (GO111MODULE=off) against Debian's packaged sources in
// /usr/share/gocode, with no module proxy; the go.mod is still needed there: it is what makes
// the go command resolve the "/v4" in golang-jwt's import path to Debian's un-suffixed directory
// (minimal module compatibility). The versions below are the Debian bookworm ones it was written
// against; a module-mode build elsewhere would also need a go.sum.
module nsminterop

go 1.19

require (
	github.com/golang-jwt/jwt/v4 v4.4.3
	google.golang.org/grpc v1.33.3
)
