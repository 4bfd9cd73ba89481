// Command nsminterop plays the Go side of NSM's per-hop tokens and mutual TLS, with the same
// libraries NSM's sdk uses (golang-jwt v4, grpc-go, crypto/tls), so that the Python proxy can
// be checked against real Go code rather than against its own reading of it.
//
// Subcommands (each prints one JSON object per result on stdout; see ../check.py):
//
//	sign      make a token as the sdk's spiffejwt generator does
//	verify    check a token with golang-jwt and parse an expiry as the sdk's reader does
//	times     format and parse RFC 3339 instants with Go's time.RFC3339Nano
//	call      one unary gRPC call over a UNIX socket with mutual TLS (a Go NSM client)
//	serve     a gRPC server on a UNIX socket with mutual TLS that checks callers' tokens
//	          as an NSM server would (a Go NSM server)
//	registry  a registry's side of the `path` metadata of NSE Register/Unregister, on a UNIX
//	          socket with mutual TLS (the sdk's grpcmetadata and updatepath servers)
//	register  an NSE's Register, refresh and Unregister as the sdk's registry client makes
//	          them: per-call tokens, and the `path` it was answered sent back
//	pathjson  encoding/json on the sdk's registry Path, for a table comparison
//
// Nothing here is NSM's code: it re-does, with the same libraries, the few steps of it that
// decide what goes on the wire, so that a difference in bytes shows up as a failed check.
package main

import (
	"crypto/ecdsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/ioutil"
	"net/url"
	"os"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	var err error
	args := os.Args[2:]
	switch os.Args[1] {
	case "sign":
		err = signCommand(args)
	case "verify":
		err = verifyCommand(args)
	case "times":
		err = timesCommand(args)
	case "call":
		err = callCommand(args)
	case "serve":
		err = serveCommand(args)
	case "registry":
		err = registryCommand(args)
	case "register":
		err = registerCommand(args)
	case "pathjson":
		err = pathJSONCommand(args)
	default:
		usage()
	}
	if err != nil {
		// A tool error (bad arguments, unreadable files) as opposed to a check that failed:
		// the driver tells the two apart by the exit status.
		fmt.Fprintln(os.Stderr, "nsminterop:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: nsminterop sign|verify|times|call|serve|registry|register|pathjson [flags]")
	os.Exit(1)
}

// printJSON writes one result line; the driver reads stdout line by line.
func printJSON(value interface{}) {
	data, err := json.Marshal(value)
	if err != nil {
		fmt.Fprintln(os.Stderr, "nsminterop: cannot encode result:", err)
		os.Exit(1)
	}
	fmt.Println(string(data))
}

// readCertificates reads every CERTIFICATE block of a PEM file, in order (a chain: leaf first).
func readCertificates(path string) ([]*x509.Certificate, error) {
	data, err := ioutil.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var certificates []*x509.Certificate
	for {
		var block *pem.Block
		block, data = pem.Decode(data)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		certificate, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		certificates = append(certificates, certificate)
	}
	if len(certificates) == 0 {
		return nil, fmt.Errorf("%s: no certificate", path)
	}
	return certificates, nil
}

// readECKey reads a PKCS#8 EC private key: the form the Workload API hands out (and what the
// lab CA writes), so a key that only works in some other encoding would be noticed.
func readECKey(path string) (*ecdsa.PrivateKey, error) {
	data, err := ioutil.ReadFile(path)
	if err != nil {
		return nil, err
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM block", path)
	}
	key, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	ecKey, ok := key.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("%s: a %T, not an EC key (ES256 needs P-256)", path, key)
	}
	return ecKey, nil
}

// spiffeID is the SPIFFE ID of an X.509-SVID: its single URI SAN, which must be a spiffe://
// URI. go-spiffe's x509svid.IDFromCert refuses anything else, and so does NSM with it.
func spiffeID(certificate *x509.Certificate) (string, error) {
	if len(certificate.URIs) != 1 {
		return "", fmt.Errorf("the certificate has %d URI SANs; an SVID has exactly one", len(certificate.URIs))
	}
	id := certificate.URIs[0]
	if id.Scheme != "spiffe" || id.Host == "" {
		return "", fmt.Errorf("URI SAN %q is not a SPIFFE ID", id.String())
	}
	return (&url.URL{Scheme: id.Scheme, Host: id.Host, Path: id.Path}).String(), nil
}

// verifySVIDChain checks a peer's certificates the way go-spiffe's x509svid.Verify does for
// tlsconfig.AuthorizeAny: the chain up to the bundle, any extended key usage, and a leaf that
// is a signing end entity (not a CA, digitalSignature, no certificate or CRL signing). It
// returns the leaf's SPIFFE ID. No host name is involved anywhere: a SPIFFE peer is named by
// its URI SAN.
func verifySVIDChain(rawCerts [][]byte, roots *x509.CertPool) (string, error) {
	if len(rawCerts) == 0 {
		return "", errors.New("the peer presented no certificate")
	}
	certificates := make([]*x509.Certificate, 0, len(rawCerts))
	for _, raw := range rawCerts {
		certificate, err := x509.ParseCertificate(raw)
		if err != nil {
			return "", fmt.Errorf("peer certificate: %w", err)
		}
		certificates = append(certificates, certificate)
	}
	leaf := certificates[0]
	id, err := spiffeID(leaf)
	if err != nil {
		return "", err
	}
	if leaf.IsCA {
		return "", errors.New("the peer's leaf is a CA certificate")
	}
	if leaf.KeyUsage&x509.KeyUsageDigitalSignature == 0 {
		return "", errors.New("the peer's leaf lacks the digitalSignature key usage")
	}
	if leaf.KeyUsage&(x509.KeyUsageCertSign|x509.KeyUsageCRLSign) != 0 {
		return "", errors.New("the peer's leaf may sign certificates or CRLs")
	}
	intermediates := x509.NewCertPool()
	for _, certificate := range certificates[1:] {
		intermediates.AddCert(certificate)
	}
	_, err = leaf.Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: intermediates,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return "", fmt.Errorf("the peer's chain does not verify with the bundle: %w", err)
	}
	return id, nil
}

// readBundle reads the trust bundle (CA certificates) into a pool.
func readBundle(path string) (*x509.CertPool, error) {
	certificates, err := readCertificates(path)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, certificate := range certificates {
		pool.AddCert(certificate)
	}
	return pool, nil
}
